"""The golden cases of StepFun's pipeline (tests/golden), as requests to our engine.

Shared by the parity tests and by bench/parity_noise.py, which measures the noise the bounds
below are chosen from (figures in tests/golden/README.md).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parent / "golden"
META = json.loads((GOLDEN / "cases.json").read_text(encoding="utf-8"))
CASES = META["cases"]
MODELS = META["models"]

# Bounds on max |ours - official|, chosen from measured noise (figures in tests/golden/README.md):
# honest noise (1 vs 2 threads, attention written out instead of SDPA, our fast path) moved tokens
# by at most 1.7e-5 and images by 6.8e-6 on the goldens' machine, and tokens by up to 3.9e-5 on
# another CPU; one wrong weight moved tokens by 3.9e-4 to 4.2e-3 and images by 1.4e-4 to 1.0e-3,
# one skipped noise draw by more than 3.
TOKEN_ATOL = 2e-4
IMAGE_ATOL = 1e-4


def write_models(root: Path) -> dict:
    """name -> folder of every tiny checkpoint the goldens were made from, written afresh."""
    from nextstep_core.tiny import write_tiny
    return {name: write_tiny(str(root / name), **spec["write_tiny"]) for name, spec in MODELS.items()}


def load_pipeline(folder: str):
    from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae
    from nextstep_core.pipeline import NextStepPipeline
    bb, tok = load_backbone(folder)
    return NextStepPipeline(bb, tok, load_flow_head(folder), load_vae(folder))


def golden(name: str) -> dict:
    return load_file(str(GOLDEN / f"{name}.safetensors"))


def request(name: str, exact: bool):
    """The golden case's arguments as the engine's Request (the official argument names kept)."""
    from nextstep_core.engine import Execution, SamplingSettings
    from nextstep_core.images import open_image
    from nextstep_core.pipeline import Request
    a = CASES[name]
    caps = a["captions"] if isinstance(a["captions"], list) else [a["captions"]]
    h, w = a["hw"]
    s = SamplingSettings(cfg=a["cfg"], cfg_img=a["cfg_img"], cfg_schedule=a["cfg_schedule"],
                         steps=a["num_sampling_steps"], shift=a["timesteps_shift"], use_norm=a["use_norm"],
                         sampler="nextstep1")
    images = [open_image(GOLDEN / a["image"])] if a["image"] else None
    # edits: the official example hands in an image already at hw; fit 'none' keeps it as it is
    return Request(caps, w, h, a["positive_prompt"] or "", a["negative_prompt"] or "", a["num_images_per_caption"],
                   a["seed"], s, images, fit="none", execution=Execution(exact=exact))


def run(pipe, name: str, exact: bool, threads: int | None = None):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return pipe.run(request(name, exact))
    finally:
        torch.set_num_threads(before)


def max_diff(result, gold: dict) -> tuple[float, float | None]:
    """(tokens, images) max abs difference; images None where the golden has none."""
    tok = (result.tokens.float() - gold["tokens"]).abs().max().item()
    img = (result.images - gold["images"]).abs().max().item() if "images" in gold else None
    return tok, img


def attend_explicitly(q, keys, values, mask):
    """Attention written out (matmul, softmax, matmul) instead of SDPA: the same maths with other
    rounding, to show that honest float noise stays inside the bounds."""
    rep = q.shape[1] // keys.shape[1]
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    scores = q @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1) @ values


def assert_tokens_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Two of our own paths that should agree (graph vs eager, streamed vs resident, sharded vs
    single file, ...): they run other kernels or other memory layouts, so the last bits may move;
    the goldens' bound holds them, and a real fault breaks it by orders of magnitude."""
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOKEN_ATOL, rtol=0)


def assert_images_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=IMAGE_ATOL, rtol=0)


@contextmanager
def patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextmanager
def one_wrong_weight(pipe, delta: float = 0.01):
    """A fault to prove the bounds can fail: one of the first layer's query weights (spread ~0.06) off."""
    w = pipe.backbone.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        w[0, 0] += delta
    try:
        yield
    finally:
        with torch.no_grad():
            w[0, 0] -= delta


@contextmanager
def one_noise_draw_ahead():
    """A fault: the noise stream one (1, 64) draw ahead, as if one draw had been skipped."""
    import nextstep_core.pipeline as pipeline
    make = pipeline.make_generator

    def ahead(seed):
        g = make(seed)
        torch.randn(1, 64, generator=g)
        return g
    with patched(pipeline, "make_generator", ahead):
        yield
