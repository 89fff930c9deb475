"""Streaming in the graph: the nodes size the backbone's resident layers from the memory ComfyUI
reports free (the host stand-in's figure), stream the rest, honour --novram, and refuse with
figures only what cannot run.

The stand-in computes on the CPU, where the pack never streams (the weights are in RAM already):
these tests lift that one guard, `bridge.streams_weights`, so the accelerator path runs here."""
import pytest
import torch

from host_stand_in import Host, host, models_dir, pack  # noqa: F401
from parity_support import assert_images_close
from test_nodes import call, load_parts, result_of, t2i_args, widget_defaults


@pytest.fixture
def accelerator(pack, monkeypatch):
    monkeypatch.setattr(pack.nodes.bridge, "streams_weights", lambda device: True)
    return pack


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory, pack):
    """A tiny model with four layers: with two, keeping one layer costs what keeping both does."""
    import importlib
    write_tiny = importlib.import_module(f"{pack.__name__}.nextstep_core.tiny").write_tiny
    base = tmp_path_factory.mktemp("deep") / "models"
    write_tiny(str(base / "nextstep" / "NextStep-1-Large"), layers=4)
    (base / "vae").mkdir()
    return base


def placed_bytes(pack, parts, layers=None, rows=2, tokens=4):
    """What the backbone holds on the device with `layers` resident (None: all) for a 32x32 run, cfg on."""
    placement = pack.nodes.placement
    bb, _head, vae = parts
    n = len(bb.module.layers)
    shape = placement.RunShape(rows, 1, tokens, pack.nodes.runner.PROMPT_TOKENS, vae.module)
    return placement.backbone_plan(bb.module, shape, None, gpu_layers=n if layers is None else layers).weight_device_bytes


def card_for(pack, host, parts, layers, spare=1000):
    """A free figure (nothing of ours placed) where exactly `layers` decoder layers fit: ComfyUI keeps
    its inference minimum (0.8 GiB + the reserve) free at every load, after the flow head and VAE."""
    mm = host.modules["comfy.model_management"]
    small = parts[1].patcher.model_size() + parts[2].patcher.model_size()  # flow head and VAE, whole
    return int(placed_bytes(pack, parts, layers) + small + mm.minimum_inference_memory()) + spare


def run_t2i(pack, parts, seed=0, **over):
    m = pack.NODE_CLASS_MAPPINGS
    out = call(m["NextStepTextToImage"], **t2i_args(pack, parts, width=32, height=32, unique_id="7", seed=seed, **over))
    return result_of(out)[0]


def counting_streamers(pack, monkeypatch):
    made = []
    real = pack.nodes.placement.stream_layers

    def stream_layers(*a, **k):
        made.append(real(*a, **k))
        return made[-1]
    monkeypatch.setattr(pack.nodes.placement, "stream_layers", stream_layers)
    return made


def on_card(pack, deep_models, monkeypatch, layers=1):
    """A stand-in host whose card fits `layers` decoder layers of the four-layer model, its parts
    loaded, and the list of streamers the nodes build."""
    host = Host(deep_models).install(monkeypatch)
    pack.nodes.bridge.register_model_folder()
    made = counting_streamers(pack, monkeypatch)
    parts = load_parts(pack)
    host.free_bytes = card_for(pack, host, parts, layers=layers)
    return host, parts, made


def test_free_memory_decides_the_resident_layers(accelerator, deep_models, monkeypatch):
    pack = accelerator
    host = Host(deep_models).install(monkeypatch)
    pack.nodes.bridge.register_model_folder()
    parts = load_parts(pack)
    bb = parts[0]
    want = run_t2i(pack, parts)  # everything fits: the whole backbone is placed
    assert "4/4 layers on the GPU, nothing streamed" in host.texts[-1][0]
    assert bb.module.streamer is None and bb.patcher.loaded_size() == placed_bytes(pack, parts)
    host.free_bytes = card_for(pack, host, parts, layers=1)  # now one layer fits, not two
    got = run_t2i(pack, parts)
    text, node = host.texts[-1]
    assert node == "7" and "1/4 layers on the GPU" in text and "streamed from CPU RAM per token" in text, text
    assert bb.module.streamer is not None and len(bb.module.streamer.streamed) == 3
    assert bb.patcher.loaded_size() == placed_bytes(pack, parts, layers=1)
    assert any(p is bb.patcher for p in host.loaded)  # ComfyUI holds it, to take back when it needs the room
    assert_images_close(got, want)


def test_the_next_run_reuses_what_is_placed(accelerator, deep_models, monkeypatch):
    pack = accelerator
    host, parts, made = on_card(pack, deep_models, monkeypatch)
    first = run_t2i(pack, parts, seed=3)
    streamer = parts[0].module.streamer
    host.free_calls.clear()
    again = run_t2i(pack, parts, seed=3)
    assert len(made) == 1 and parts[0].module.streamer is streamer  # nothing rebuilt, nothing moved
    assert "1/4 layers on the GPU" in host.texts[-1][0]
    assert parts[0].patcher.loaded_size() == placed_bytes(pack, parts, layers=1)
    assert_images_close(again, first)


def test_storyboard_panels_share_one_placement(accelerator, deep_models, monkeypatch):
    pack = accelerator
    host, parts, made = on_card(pack, deep_models, monkeypatch)  # the story's growing cache fits in ComfyUI's minimum
    m = pack.NODE_CLASS_MAPPINGS
    args = widget_defaults(m["NextStepStoryboard"])
    args.update(dict(zip(("backbone", "flow_head", "vae"), parts)), width=32, height=32, steps=2,
                panels="a girl finds a map\nshe walks into a forest\nshe finds a door", seed=5, unique_id="9")
    images, story = result_of(call(m["NextStepStoryboard"], **args))
    assert images.shape[0] == 3 and len(made) == 1, host.texts
    assert len(host.texts) == 3 and all("1/4 layers on the GPU" in t for t, _n in host.texts), host.texts


def test_comfyui_takes_the_memory_back_and_the_next_run_places_again(accelerator, deep_models, monkeypatch):
    pack = accelerator
    host, parts, _made = on_card(pack, deep_models, monkeypatch)
    mm = host.modules["comfy.model_management"]
    bb = parts[0]
    want = run_t2i(pack, parts)
    layer0 = bb.module.layers[0].self_attn.o_proj.weight
    mm.free_memory(host.free_bytes, mm.get_torch_device())  # another model needs the whole card
    assert bb.module.streamer is None and bb.patcher.loaded_size() == 0
    assert bb.patcher.model_size() == placed_bytes(pack, parts)  # the next load asks for room for all of it
    assert torch.equal(bb.module.layers[0].self_attn.o_proj.weight, layer0)  # weights intact in RAM
    got = run_t2i(pack, parts)
    assert bb.module.streamer is not None and "1/4 layers on the GPU" in host.texts[-1][0]
    assert_images_close(got, want)
    mm.unload_all_models()  # --disable-smart-memory, after every prompt
    assert bb.module.streamer is None and bb.patcher.loaded_size() == 0


def test_novram_streams_every_layer(accelerator, host):
    pack = accelerator
    parts = load_parts(pack)
    want = run_t2i(pack, parts)
    mm = host.modules["comfy.model_management"]
    mm.unload_all_models()
    mm.vram_state = mm.VRAMState.NO_VRAM  # as if started with --novram
    got = run_t2i(pack, parts)
    assert "0/2 layers on the GPU" in host.texts[-1][0], host.texts[-1]
    assert parts[0].module.streamer is not None and len(parts[0].module.streamer.streamed) == 2
    assert_images_close(got, want)


def test_too_little_memory_is_refused_with_the_figures(accelerator, host):
    from comfyui_nextstep_under_test.nextstep_core.errors import DeviceError
    pack = accelerator
    parts = load_parts(pack)
    host.free_bytes = card_for(pack, host, parts, layers=0, spare=-(1 << 20))
    with pytest.raises(DeviceError, match=r"even with every decoder layer streamed.*GiB is free"):
        run_t2i(pack, parts)


def test_a_run_that_failed_mid_token_leaves_no_stale_prefetch(accelerator, deep_models, monkeypatch):
    """The placement outlives a run, so a run stopped inside the layers (out of memory, a bad value)
    must not leave a prefetched layer that the next run trusts after its buffer was reused."""
    pack = accelerator
    host, parts, _made = on_card(pack, deep_models, monkeypatch)
    want = run_t2i(pack, parts, seed=4)
    streamer = parts[0].module.streamer
    calls = {"n": 0}

    def fail_once(layer, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("stopped inside the layers")
    handle = parts[0].module.layers[2].register_forward_pre_hook(fail_once)
    with pytest.raises(RuntimeError, match="stopped inside the layers"):
        run_t2i(pack, parts, seed=4)
    handle.remove()
    stuck = parts[0].module.layers[2]
    assert any(p.data_ptr() != h.data_ptr() for p, h in zip(stuck.parameters(), streamer.views[id(stuck)]))
    streamer.reset()  # what the next run's placement does first
    assert all(p.data_ptr() == h.data_ptr() for p, h in zip(stuck.parameters(), streamer.views[id(stuck)]))
    got = run_t2i(pack, parts, seed=4)
    assert parts[0].module.streamer is streamer
    assert_images_close(got, want)


def test_cpu_runs_say_where_they_run_and_comfyui_logs_readable_names(pack, host):
    parts = load_parts(pack)
    run_t2i(pack, parts)
    assert host.texts[-1] == ("2/2 layers on cpu, nothing streamed (streaming is for CUDA GPUs)", "7")
    assert [type(p.patcher.model).__name__ for p in parts] == ["NextStepBackbone", "NextStepFlowHead", "NextStepVAE"]
