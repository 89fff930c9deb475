"""dtype auto: bfloat16 only where the chosen GPU computes it in hardware, and a float16 overflow
said in words instead of drawn as a black image."""
import contextlib

import pytest
import torch

from nextstep_core.devices import resolve_dtype
from nextstep_core.engine import Execution, SamplingSettings
from nextstep_core.errors import DeviceError
from nextstep_core.pipeline import Request
from nextstep_core.story import StorySettings, Storyboard


class TwoGpus:
    """cuda:0 an Ampere card (bf16 in hardware), cuda:1 a T4 (bf16 only emulated); torch's check asks
    about the current device, as the real one does."""

    def __init__(self, monkeypatch, emulation: bool = True):
        self.current, self.emulation = 0, emulation
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", self.is_bf16_supported)

    @contextlib.contextmanager
    def device(self, dev):
        before, self.current = self.current, torch.device(dev).index or 0
        try:
            yield
        finally:
            self.current = before

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        return self.current == 0 or (including_emulation and self.emulation)


def test_auto_asks_the_chosen_gpu_for_bf16_in_hardware(monkeypatch):
    TwoGpus(monkeypatch)
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 1)) is torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32


def test_bf16_asked_for_on_a_gpu_that_only_emulates_it_warns(monkeypatch):
    TwoGpus(monkeypatch)
    with pytest.warns(UserWarning, match="emulates it"):
        assert resolve_dtype("bf16", torch.device("cuda", 1)) is torch.bfloat16
    TwoGpus(monkeypatch, emulation=False)
    with pytest.raises(DeviceError, match="cuda:1 has no bfloat16 support"):
        resolve_dtype("bfloat16", torch.device("cuda", 1))


def _with_massive_activations(tiny_model, dtype):
    """The tiny model with one MLP whose output exceeds float16's range (65504), as a 14B model's
    hidden states can; float32 holds it."""
    from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae
    from nextstep_core.pipeline import NextStepPipeline
    bb, tok = load_backbone(tiny_model, "cpu", dtype)
    with torch.no_grad():
        bb.layers[0].mlp.down_proj.weight.fill_(6e4)
    return NextStepPipeline(bb, tok, load_flow_head(tiny_model, "cpu", dtype), load_vae(tiny_model, "cpu", dtype))


def test_a_float16_overflow_is_an_error_that_says_what_to_choose(tiny_model):
    req = Request(["a red cup"], 32, 32, seed=1, sampling=SamplingSettings(steps=2, cfg=3.0))
    assert torch.isfinite(_with_massive_activations(tiny_model, torch.float32).run(req).tokens).all()
    pipe = _with_massive_activations(tiny_model, torch.float16)
    for exact in (False, True):
        req = Request(["a red cup"], 32, 32, seed=1, sampling=SamplingSettings(steps=2, cfg=3.0),
                      execution=Execution(exact=exact))
        with pytest.raises(DeviceError, match=r"overflowed float16 \(after reading the prompt\).*bfloat16.*float32"):
            pipe.run(req)
    with pytest.raises(DeviceError, match="overflowed float16"):
        Storyboard(pipe).run(["one"], StorySettings(32, 32, SamplingSettings(steps=2, cfg=3.0)), seed=1)


def test_values_that_go_bad_while_drawing_are_caught_at_the_end(tiny_pipeline, monkeypatch):
    from nextstep_core import engine
    real = engine.TokenLoop.run

    def nan_tokens(self, *a, **k):
        out = real(self, *a, **k)
        out[:, -1] = float("nan")
        return out
    monkeypatch.setattr(engine.TokenLoop, "run", nan_tokens)
    with pytest.raises(DeviceError, match=r"inf/NaN values \(while drawing the image\) in float32"):
        tiny_pipeline.run(Request(["a"], 32, 32, seed=1, sampling=SamplingSettings(steps=2)))
