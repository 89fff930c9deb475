"""End to end through `python -m nextstep_core`, as a user runs it."""
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT

FAST = ["--steps", "3", "--quiet"]


def cli(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "nextstep_core", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_tiny_then_generate_writes_images_and_the_tokens_contract(tmp_path):
    model = tmp_path / "NextStep-1-Large"
    cli("tiny", model)
    out, toks = tmp_path / "img.png", tmp_path / "t.safetensors"
    cli("generate", "--model", model, "--prompt", "a red cube", "--width", 64, "--height", 32, "--seed", 1,
        "--out", out, "--tokens-out", toks, *FAST)
    with Image.open(out) as img:
        assert img.size == (64, 32) and img.mode == "RGB"
    data = load_file(toks)
    assert set(data) == {"tokens", "images"}
    assert data["tokens"].shape == (1, 2 * 4, 64) and data["tokens"].dtype == torch.float32
    assert data["images"].shape == (1, 32, 64, 3) and 0 <= data["images"].min() and data["images"].max() <= 1


def test_batch_of_prompts_and_images_per_prompt(tiny_model, tmp_path):
    toks = tmp_path / "t.safetensors"
    cli("generate", "--model", tiny_model, "--prompt", "a", "--prompt", "b", "--num-images", 2, "--width", 32,
        "--height", 32, "--out", tmp_path / "b.png", "--tokens-out", toks, *FAST)
    assert sorted(p.name for p in tmp_path.glob("b-*.png")) == [f"b-{i}.png" for i in range(4)]
    tokens = load_file(toks)["tokens"]
    assert tokens.shape == (4, 4, 64)
    # the official noise rule: image i of every prompt shares its noise, so the prompt changes the result
    assert not torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[0], tokens[1])


def test_same_seed_is_bit_equal_and_another_seed_differs(tiny_model, tmp_path):
    runs = []
    for i, seed in enumerate((5, 5, 6)):
        path = tmp_path / f"{i}.safetensors"
        cli("generate", "--model", tiny_model, "--prompt", "x", "--width", 32, "--height", 48, "--seed", seed,
            "--out", tmp_path / f"{i}.png", "--tokens-out", path, *FAST)
        runs.append(load_file(path)["tokens"])
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_edit_round_trip_with_a_non_square_rgba_input(tiny_edit_model, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGBA", (70, 40), (200, 30, 30, 128)).save(src)
    toks = tmp_path / "t.safetensors"
    cli("edit", "--model", tiny_edit_model, "--prompt", "make it blue", "--image", src, "--fit", "resize",
        "--fit-size", 48, "--out", tmp_path / "e.png", "--tokens-out", toks, *FAST)
    with Image.open(tmp_path / "e.png") as img:
        w, h = img.size
    assert w % 16 == 0 and h % 16 == 0 and w > h
    assert load_file(toks)["tokens"].shape == (1, (w // 16) * (h // 16), 64)


def test_linear_schedule_use_norm_and_other_samplers_run(tiny_model, tmp_path):
    for sampler in ("nextstep1.1", "ode"):
        toks = tmp_path / f"{sampler}.safetensors"
        cli("generate", "--model", tiny_model, "--prompt", "x", "--width", 32, "--height", 32, "--sampler", sampler,
            "--cfg-schedule", "linear", "--use-norm", "--out", tmp_path / "s.png", "--tokens-out", toks, *FAST)
        tokens = load_file(toks)["tokens"]
        torch.testing.assert_close(tokens.mean(-1), torch.zeros(1, 4), atol=1e-5, rtol=0)  # use_norm


@pytest.mark.parametrize("args,message", [
    (["--width", 50, "--height", 64], "width=50 is not a multiple of 16.*48 or 64"),
    (["--cfg", 0.5], "cfg=0.5 is below 1"),
    (["--steps", 0], "steps=0"),
    (["--device", "cuda"], "no CUDA GPU" if not torch.cuda.is_available() else None),
])
def test_bad_settings_exit_with_a_clear_message(tiny_model, tmp_path, args, message):
    if message is None:
        pytest.skip("this machine has CUDA")
    proc = cli("generate", "--model", tiny_model, "--prompt", "x", "--out", tmp_path / "x.png", "--quiet", *args,
               ok=False)
    assert proc.returncode == 2
    assert __import__("re").search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_tiny_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = cli("tiny", tmp_path, ok=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_storyboard_and_self_cot_from_the_shell(tiny_model, tmp_path):
    toks = tmp_path / "s.safetensors"
    cli("storyboard", "--model", tiny_model, "--panel", "a knight", "--panel", "a dragon", "--width", 32, "--height",
        32, "--seed", 2, "--out", tmp_path / "p.png", "--tokens-out", toks, *FAST)
    assert load_file(toks)["tokens"].shape == (2, 4, 64)
    assert (tmp_path / "p-0.png").exists() and (tmp_path / "p-1.png").exists()
    proc = cli("generate", "--model", tiny_model, "--prompt", "a fox", "--self-cot", "--reasoning", "it is red",
               "--width", 32, "--height", 32, "--out", tmp_path / "c.png", "--steps", "2")
    assert "reasoning[0]: it is red" in proc.stderr


def test_model_argument_is_a_path_or_a_hub_repo_id(tiny_model, monkeypatch, tmp_path):
    import huggingface_hub
    from nextstep_core.cli import resolve_model
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: asked.append(repo) or str(tmp_path))
    assert resolve_model(tiny_model) == tiny_model
    assert resolve_model("./no/such/folder") == "./no/such/folder"
    assert asked == []
    assert resolve_model("stepfun-ai/NextStep-1-Large") == str(tmp_path)
    assert asked == ["stepfun-ai/NextStep-1-Large"]


def test_edit_with_a_size_gives_stepfuns_tokens_for_the_same_arguments(tmp_path):
    """StepFun's edit example resizes the input to hw and draws hw: `edit --width 64 --height 64` on a
    64x64 input is conditioned on its 16 input tokens, and gives the official tokens."""
    import parity_support as ps
    model = ps.write_models(tmp_path)["edit"]
    a = ps.CASES["edit"]
    toks = tmp_path / "e.safetensors"
    cli("edit", "--model", model, "--image", ps.GOLDEN / a["image"], "--prompt", a["captions"].replace("<image>", ""),
        "--width", 64, "--height", 64, "--cfg", a["cfg"], "--cfg-img", a["cfg_img"], "--steps",
        a["num_sampling_steps"], "--shift", a["timesteps_shift"], "--use-norm", "--negative", a["negative_prompt"],
        "--positive", "", "--seed", a["seed"], "--exact", "--quiet", "--out", tmp_path / "e.png", "--tokens-out", toks)
    ps.assert_tokens_close(load_file(toks)["tokens"], ps.golden("edit")["tokens"])


def test_fit_size_with_an_output_size_is_refused(tiny_edit_model, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(src)
    proc = cli("edit", "--model", tiny_edit_model, "--prompt", "x", "--image", src, "--width", 64, "--height", 64,
               "--fit-size", 256, "--out", tmp_path / "e.png", *FAST, ok=False)
    assert proc.returncode == 2 and "--fit-size 256 applies only without --width/--height" in proc.stderr
