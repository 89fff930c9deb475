"""Low-VRAM layer streaming: the same numbers as a resident model, and an honest cost estimate."""
import torch

from nextstep_core.checkpoint import load_backbone
from nextstep_core.engine import SamplingSettings
from nextstep_core.offload import stream_layers
from nextstep_core.pipeline import Request
from parity_support import assert_tokens_close


def test_streamed_layers_give_the_same_tokens(tiny_pipeline, tiny_model):
    req = Request(["a lamp"], 32, 48, seed=2, sampling=SamplingSettings(steps=3, cfg=3.0))
    want = tiny_pipeline.run(req).tokens
    bb = tiny_pipeline.backbone
    streamer = stream_layers(bb, gpu_layers=1)
    try:
        assert streamer.plan.streamed == 1 and streamer.plan.streamed_bytes > 0
        assert "streamed from CPU RAM" in streamer.plan.describe()
        got = tiny_pipeline.run(req).tokens
    finally:
        streamer.remove()
    assert_tokens_close(got, want)
    assert torch.equal(tiny_pipeline.run(req).tokens, want)  # the same computation again, after streaming


def test_all_layers_resident_means_no_streaming(tiny_model):
    bb, _ = load_backbone(tiny_model)
    assert stream_layers(bb, gpu_layers=len(bb.layers)) is None
