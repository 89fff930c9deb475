"""Streaming in the graph: the nodes size the backbone's resident layers from the memory ComfyUI
reports free (the host stand-in's figure), stream the rest, honour --novram, and refuse with
figures only what cannot run.

The stand-in computes on the CPU, where the pack never streams (the weights are in RAM already):
these tests lift that one guard, `bridge.streams_weights`, so the accelerator path runs here."""
import pytest

from host_stand_in import Host, host, models_dir, pack  # noqa: F401
from parity_support import assert_images_close
from test_nodes import call, load_parts, result_of, t2i_args


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


def needed(pack, parts, rows=2, tokens=4, layers=None):
    """Device bytes the node's plan asks for with `layers` resident (None: all) at 32x32, cfg on."""
    placement = pack.nodes.placement
    bb, head, vae = parts
    n = len(bb.module.layers)
    runner = pack.nodes.runner
    return placement.backbone_plan(bb, vae, rows, 1, tokens, runner.PROMPT_TOKENS, None,
                                   gpu_layers=n if layers is None else layers).device_bytes


def run_t2i(pack, parts, **over):
    m = pack.NODE_CLASS_MAPPINGS
    out = call(m["NextStepTextToImage"], **t2i_args(pack, parts, width=32, height=32, unique_id="7", **over))
    return result_of(out)[0]


def test_free_memory_decides_the_resident_layers(accelerator, deep_models, monkeypatch):
    pack = accelerator
    host = Host(deep_models).install(monkeypatch)
    pack.nodes.bridge.register_model_folder()
    parts = load_parts(pack)
    bb = parts[0]
    want = run_t2i(pack, parts)  # everything fits: the whole backbone is loaded through ComfyUI
    assert "4/4 layers on the GPU, nothing streamed" in host.texts[-1][0]
    assert host.loaded[0] is bb.patcher
    host.free_bytes = needed(pack, parts, layers=1) + host.reserved_bytes + 1000  # one layer fits, not two
    host.load_calls.clear()
    got = run_t2i(pack, parts)
    text, node = host.texts[-1]
    assert node == "7" and "1/4 layers on the GPU" in text and "streamed from CPU RAM per token" in text, text
    assert host.free_calls[-1][2] == [parts[1].patcher, parts[2].patcher]  # ComfyUI offloads others, not these
    assert [p for call_ in host.load_calls for p in call_[0]] == [parts[1].patcher, parts[2].patcher]
    assert bb.module.streamer is None  # removed after the run
    assert_images_close(got, want)


def test_novram_streams_every_layer(accelerator, host):
    pack = accelerator
    parts = load_parts(pack)
    want = run_t2i(pack, parts)
    mm = host.modules["comfy.model_management"]
    mm.vram_state = mm.VRAMState.NO_VRAM
    got = run_t2i(pack, parts)
    assert "0/2 layers on the GPU" in host.texts[-1][0], host.texts[-1]
    assert_images_close(got, want)


def test_too_little_memory_is_refused_with_the_figures(accelerator, host):
    from comfyui_nextstep_under_test.nextstep_core.errors import DeviceError
    pack = accelerator
    parts = load_parts(pack)
    host.free_bytes = needed(pack, parts, layers=0) + host.reserved_bytes - (1 << 20)
    with pytest.raises(DeviceError, match=r"even with every decoder layer streamed.*GiB is free"):
        run_t2i(pack, parts)
