"""Our engine against StepFun's own pipeline (golden files in tests/golden, see its README)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDEN
from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae
from nextstep_core.engine import SamplingSettings
from nextstep_core.images import open_image
from nextstep_core.pipeline import NextStepPipeline, Request
from nextstep_core.prompts import build_rows

CASES = json.loads((GOLDEN / "cases.json").read_text())


@pytest.fixture(scope="module")
def pipe(official_fixture):
    bb, tok = load_backbone(official_fixture)
    return NextStepPipeline(bb, tok, load_flow_head(official_fixture), load_vae(official_fixture))


def request_for(args, exact):
    caps = args["captions"] if isinstance(args["captions"], list) else [args["captions"]]
    h, w = args["hw"]
    s = SamplingSettings(cfg=args["cfg"], cfg_img=args["cfg_img"], cfg_schedule=args["cfg_schedule"],
                         steps=args["num_sampling_steps"], shift=args["timesteps_shift"], use_norm=args["use_norm"],
                         sampler="nextstep1", exact=exact)
    images = [open_image(GOLDEN / "edit_input.png")] if args.get("images") else None
    return Request(caps, w, h, args["positive_prompt"] or "", args["negative_prompt"] or "",
                   args["num_images_per_caption"], args["seed"], s, images, fit="none")


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompt_rows_equal_official(pipe, name):
    args, gold = CASES[name], load_file(GOLDEN / f"{name}.safetensors")
    caps = args["captions"] if isinstance(args["captions"], list) else [args["captions"]]
    h, w = args["hw"]
    rows = build_rows(pipe.tokenizer, caps, images_per_prompt=args["num_images_per_caption"],
                      positive=args["positive_prompt"], negative=args["negative_prompt"], cfg=args["cfg"],
                      cfg_img=args["cfg_img"], out_tokens_hw=(h // 16, w // 16),
                      edit_tokens_hw=(h // 16, w // 16) if args.get("images") else None)
    assert torch.equal(rows.input_ids, gold["input_ids"])
    assert torch.equal(rows.attention_mask, gold["attention_mask"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_mode_reproduces_official_tokens_bit_for_bit(pipe, name):
    torch.set_num_threads(1)  # the goldens were made with one thread; thread count moves the last bits
    try:
        result = pipe.run(request_for(CASES[name], exact=True))
    finally:
        torch.set_num_threads(2)
    gold = load_file(GOLDEN / f"{name}.safetensors")
    assert torch.equal(result.tokens, gold["tokens"])
    # images are decoded one at a time (the reference decodes the batch at once): rounding only
    torch.testing.assert_close(result.images, gold["images"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_mode_matches_official_within_float_rounding(pipe, name):
    result = pipe.run(request_for(CASES[name], exact=False))
    gold = load_file(GOLDEN / f"{name}.safetensors")
    torch.testing.assert_close(result.tokens, gold["tokens"], atol=5e-4, rtol=0)
    torch.testing.assert_close(result.images, gold["images"], atol=5e-4, rtol=0)
