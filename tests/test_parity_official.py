"""Our engine against StepFun's own pipeline: goldens in tests/golden, made by running the official
code on tiny checkpoints this pack writes itself (tests/golden/README.md says how), so every clone
checks the pack's central promise with nothing from outside the repository."""
import pytest
import torch

import parity_support as ps
from nextstep_core.prompts import build_rows
from nextstep_core.tiny import digest


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return ps.write_models(tmp_path_factory.mktemp("golden-models"))


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: ps.load_pipeline(folder) for name, folder in folders.items()}


def test_the_tiny_checkpoints_are_the_ones_the_goldens_were_made_from(folders):
    """`tiny` must write the same numbers on every machine, or the goldens would not apply."""
    for name, folder in folders.items():
        want, got = ps.MODELS[name]["digest"], digest(folder)
        changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        assert not changed, f"tiny checkpoint '{name}': {changed} differ from the ones the goldens were made from"


@pytest.mark.parametrize("name", sorted(ps.CASES))
def test_prompt_rows_equal_official(pipes, name):
    args, gold = ps.CASES[name], ps.golden(name)
    caps = args["captions"] if isinstance(args["captions"], list) else [args["captions"]]
    h, w = args["hw"]
    rows = build_rows(pipes[args["model"]].tokenizer, caps, images_per_prompt=args["num_images_per_caption"],
                      positive=args["positive_prompt"], negative=args["negative_prompt"], cfg=args["cfg"],
                      cfg_img=args["cfg_img"], out_tokens_hw=(h // 16, w // 16),
                      edit_tokens_hw=(h // 16, w // 16) if args["image"] else None)
    assert torch.equal(rows.input_ids, gold["input_ids"])  # integers: exact
    assert torch.equal(rows.attention_mask, gold["attention_mask"])


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("name", sorted(ps.CASES))
def test_tokens_and_images_match_official(pipes, name, exact):
    """Within bounds measured from honest float noise (threads, attention kernels, CPU types; the
    figures are in tests/golden/README.md). On the machine and thread count that made the goldens,
    exact mode reproduces them bit for bit; elsewhere the last bits may move."""
    result = ps.run(pipes[ps.CASES[name]["model"]], name, exact)
    gold = ps.golden(name)
    assert result.tokens.shape == gold["tokens"].shape
    torch.testing.assert_close(result.tokens.float(), gold["tokens"], atol=ps.TOKEN_ATOL, rtol=0)
    if "images" in gold:  # the square-count non-square case has none: the release decodes it wrongly
        torch.testing.assert_close(result.images, gold["images"], atol=ps.IMAGE_ATOL, rtol=0)


def _token_error(pipe, name) -> float:
    return ps.max_diff(ps.run(pipe, name, exact=True), ps.golden(name))[0]


def test_attention_computed_another_way_stays_inside_the_bound(pipes):
    import nextstep_core.backbone as backbone
    with ps.patched(backbone, "attend", ps.attend_explicitly):
        err = _token_error(pipes["t2i"], "t2i_64")
    assert err < ps.TOKEN_ATOL


def test_one_wrong_weight_breaks_the_bound(pipes):
    with ps.one_wrong_weight(pipes["t2i"]):
        err = _token_error(pipes["t2i"], "t2i_64")
    assert err > 5 * ps.TOKEN_ATOL


def test_one_skipped_noise_draw_breaks_the_bound(pipes):
    with ps.one_noise_draw_ahead():
        err = _token_error(pipes["t2i"], "t2i_64")
    assert err > 100 * ps.TOKEN_ATOL


def test_edits_without_the_discarded_posterior_draw_break_the_bound(pipes):
    """The release draws (and throws away) a VAE posterior sample before the first token."""
    from nextstep_core.noise import TokenNoise
    with ps.patched(TokenNoise, "discard", lambda self, shape: None):
        err = _token_error(pipes["edit"], "edit")
    assert err > 100 * ps.TOKEN_ATOL
