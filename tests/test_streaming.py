"""Low-VRAM layer streaming: the same numbers as a resident model, and an honest cost estimate."""
import torch

from nextstep_core.checkpoint import load_backbone
from nextstep_core.engine import SamplingSettings
from nextstep_core.weights.streaming import layer_bytes, stream_layers
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


def test_nothing_resident_streams_every_layer(tiny_pipeline):
    """What ComfyUI's --novram gets: every decoder layer crosses over each token."""
    req = Request(["a lamp"], 32, 32, seed=5, sampling=SamplingSettings(steps=2, cfg=3.0))
    want = tiny_pipeline.run(req).tokens
    streamer = stream_layers(tiny_pipeline.backbone, gpu_layers=0)
    try:
        assert streamer.plan.resident == 0 and len(streamer.streamed) == len(tiny_pipeline.backbone.layers)
        got = tiny_pipeline.run(req).tokens
    finally:
        streamer.remove()
    assert_tokens_close(got, want)


def test_host_copies_are_exact_buffers_and_two_device_buffers_are_reused(tiny_model):
    bb, tok = load_backbone(tiny_model)
    layer_sizes = [layer_bytes(layer) for layer in bb.layers]
    streamer = stream_layers(bb, gpu_layers=0)
    try:
        # one host buffer per layer: its bytes plus alignment padding, no power-of-two rounding
        hosts = [streamer.hosts[id(layer)] for layer in bb.layers]
        assert all(h.numel() == streamer.span for h in hosts)
        assert max(layer_sizes) <= streamer.span < max(layer_sizes) + 256 * 64
        slots = {s.data_ptr() for s in streamer.slots}
        assert len(slots) == 2 and all(s.numel() == streamer.span for s in streamer.slots)
        seen = set()
        hooks = [layer.register_forward_pre_hook(lambda m, a: None) for layer in bb.layers]  # after the streamer's

        def record(module, args):
            seen.add(next(module.parameters()).untyped_storage().data_ptr())
        hooks += [layer.mlp.register_forward_pre_hook(record) for layer in bb.layers]
        for seed in (1, 2):
            run_tokens(bb, tok, tiny_model, seed)
        assert seen == slots  # every layer ran from one of the two preallocated buffers, nothing else
        assert {s.data_ptr() for s in streamer.slots} == slots
        for layer, host in zip(bb.layers, hosts):
            assert all(p.untyped_storage().data_ptr() == host.data_ptr() for p in layer.parameters())
    finally:
        for h in hooks:
            h.remove()
        streamer.remove()


def test_cli_low_vram_mode_loads_into_ram_and_moves_only_what_stays(tiny_model, tmp_path, monkeypatch, capsys):
    import nextstep_core.checkpoint as checkpoint
    import nextstep_core.weights.streaming as streaming
    from nextstep_core.cli import main
    seen = {}
    real_load, real_stream = checkpoint.load_backbone, streaming.stream_layers

    def load(folder, device="cpu", *a, **k):
        seen["load"] = str(device)
        return real_load(folder, device, *a, **k)

    def stream(backbone, gpu_layers, device=None, plan=None):
        seen["stream"] = (gpu_layers, str(device), plan.resident)
        return real_stream(backbone, gpu_layers, device, plan)
    monkeypatch.setattr(checkpoint, "load_backbone", load)
    monkeypatch.setattr(streaming, "stream_layers", stream)
    assert main(["generate", "--model", tiny_model, "--prompt", "x", "--width", "32", "--height", "32", "--steps", "2",
                 "--device", "cpu", "--gpu-layers", "1", "--out", str(tmp_path / "a.png")]) == 0
    assert seen == {"load": "cpu", "stream": (1, "cpu", 1)}
    assert "low-VRAM mode: 1/2 layers on the GPU" in capsys.readouterr().err


def run_tokens(bb, tok, folder, seed):
    from nextstep_core.checkpoint import load_flow_head, load_vae
    from nextstep_core.pipeline import NextStepPipeline
    pipe = NextStepPipeline(bb, tok, load_flow_head(folder), load_vae(folder))
    pipe.decode = lambda tokens, grid: tokens
    return pipe.run(Request(["a cup"], 32, 32, seed=seed, sampling=SamplingSettings(steps=2))).tokens


def _host_storages(bb) -> dict:
    """layer index -> the one host storage its parameters are views of (layers not streamed: absent)."""
    out = {}
    for i, layer in enumerate(bb.layers):
        ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters() if p.device.type == "cpu"}
        if len(ptrs) == 1:
            out[i] = ptrs.pop()
    return out


def test_placing_again_keeps_the_host_copies_of_layers_that_stay_streamed(tiny_model):
    """No second copy of the streamed layers in RAM: placing again (as a memory manager does after an
    unload: remove, move, place) reuses each still-streamed layer's buffer, and allocates only for
    layers newly streamed, after the buffers of layers that became resident are gone."""
    bb, tok = load_backbone(tiny_model)
    want = run_tokens(bb, tok, tiny_model, 3)
    streamer = stream_layers(bb, gpu_layers=0)
    first = _host_storages(bb)
    assert sorted(first) == [0, 1]
    streamer.remove()
    bb.to("cpu")  # what an unload does before the next placement
    streamer = stream_layers(bb, gpu_layers=0)
    assert _host_storages(bb) == first  # the same buffers: nothing copied, nothing allocated
    streamer = stream_layers(bb, gpu_layers=1)  # layer 0 becomes resident, layer 1 stays streamed
    assert _host_storages(bb)[1] == first[1]
    streamer = stream_layers(bb, gpu_layers=0)  # layer 0 streams again: a buffer for it alone
    again = _host_storages(bb)
    assert again[1] == first[1] and sorted(again) == [0, 1]
    try:
        assert_tokens_close(run_tokens(bb, tok, tiny_model, 3), want)
    finally:
        streamer.remove()


def test_cli_plan_counts_the_lm_head_self_cot_will_read(tiny_model, tmp_path, monkeypatch):
    """The LM head is read after placement, on the device: the plan must leave room for it."""
    import nextstep_core.weights.streaming as streaming
    from nextstep_core.cli import main
    from nextstep_core.memory import weight_bytes
    plans = []
    real = streaming.stream_layers
    monkeypatch.setattr(streaming, "stream_layers", lambda bb, n, device=None, plan=None: plans.append(plan) or
                        real(bb, n, device, plan))
    base = ["generate", "--model", tiny_model, "--prompt", "x", "--width", "32", "--height", "32", "--steps", "2",
            "--device", "cpu", "--gpu-layers", "1", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(base + ["--self-cot", "--think-tokens", "2", "--out", str(tmp_path / "b.png")]) == 0
    plain, cot = plans
    cfg = load_backbone(tiny_model)[0].cfg
    head = weight_bytes(cfg, None, 4, lm_head=True)[1] - weight_bytes(cfg, None, 4)[1]
    assert head > 0 and cot.fixed_weight_bytes - plain.fixed_weight_bytes == head
