"""The memory model: byte counts against real modules, decisions for the card sizes users have,
and the refusal with figures when even streaming everything cannot run."""
import pytest
import torch

from nextstep_core.checkpoint import load_backbone
from nextstep_core.config import BackboneConfig
from nextstep_core.errors import DeviceError, SettingsError
from nextstep_core.devices import SLACK
from nextstep_core.memory import GiB, plan, weight_bytes

FULL = BackboneConfig(hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
                      intermediate_size=13824, vocab_size=152064)
OTHER = int(0.48e9)  # flow head (157M) + VAE (84M) in bf16


@pytest.mark.parametrize("fmt", [None, "int8", "fp8", "int4"])
def test_weight_bytes_are_what_a_loaded_backbone_holds(fmt, tiny_model):
    bb, _ = load_backbone(tiny_model, quant=fmt)
    layer, rest = weight_bytes(bb.cfg, fmt, 4)
    state = bb.state_dict()
    held = {n: t.numel() * t.element_size() for n, t in state.items()}
    assert sum(v for n, v in held.items() if n.startswith("layers.0.")) == layer
    assert sum(v for n, v in held.items() if not n.startswith("layers.")) == rest


def test_full_size_weight_figures():
    per_format = {fmt: weight_bytes(FULL, fmt, 2) for fmt in (None, "int8", "int4")}
    matrices = {fmt: layer * 48 / 1e9 for fmt, (layer, _rest) in per_format.items()}
    assert 26.4 < matrices[None] < 26.6  # bf16, with norms and biases
    assert 13.2 < matrices["int8"] < 13.4
    assert 7.0 < matrices["int4"] < 7.2  # the "about 7.5 GB", with bf16 scale/zero pairs per 128
    assert per_format["int4"][1] == per_format[None][1]  # embeddings, projectors and norms stay bf16


def decide(fmt, gib, **kw):
    return plan(FULL, fmt, 2, width=512, height=512, free_bytes=int(gib * GiB), other_weight_bytes=OTHER, **kw)


def test_decisions_for_card_sizes():
    assert decide(None, 48).streamed == 0
    assert decide("int8", 24).streamed == 0
    assert decide("int4", 12).streamed == 0  # a 12 GB card keeps an int4 backbone whole
    bf16_24 = decide(None, 24)
    assert 0 < bf16_24.resident < 48 and bf16_24.buffer_bytes == 2 * bf16_24.layer_bytes
    int8_12 = decide("int8", 12)
    int4_8 = decide("int4", 8)
    for p, gib in ((bf16_24, 24), (int8_12, 12), (int4_8, 8)):
        assert 0 < p.streamed < 48
        assert p.device_bytes <= gib * GiB < p.device_bytes + p.layer_bytes  # as many layers as fit, no more
        assert "streamed from CPU RAM per token" in p.describe()
    assert decide("int4", 8).resident > decide("int8", 8).resident
    assert decide("int8", 16).resident > decide("int8", 12).resident


def test_more_rows_and_context_leave_fewer_layers():
    base = decide("int8", 12)
    assert decide("int8", 12, batch=4).resident < base.resident
    assert decide("int8", 12, context_tokens=4096).kv_bytes > base.kv_bytes
    assert decide("int8", 12, cfg_rows=1).kv_bytes * 2 == base.kv_bytes


def test_refuses_only_what_cannot_run_fully_streamed():
    everything = decide("int4", 3.35)
    assert everything.resident == 0  # 3.35 GiB free: still runs, every layer streamed
    with pytest.raises(DeviceError, match=r"needs \d+\.\d\d GiB on the GPU even with every decoder layer streamed.*"
                                          r"only 2\.00 GiB is free"):
        decide("int4", 2)
    with pytest.raises(DeviceError, match="KV cache"):
        decide("int4", 8, batch=16, context_tokens=20000)


def test_fixed_layer_counts_and_unknown_memory():
    assert decide("int8", 12, gpu_layers=10).resident == 10
    with pytest.raises(SettingsError, match="gpu_layers=49: use 0..48"):
        decide("int8", 12, gpu_layers=49)
    cpu = plan(FULL, "int8", 2, width=512, height=512)
    assert cpu.streamed == 0 and cpu.free_bytes is None
    assert cpu.device_bytes == (cpu.fixed_weight_bytes + 48 * cpu.layer_bytes + cpu.kv_bytes
                                + cpu.activation_bytes + SLACK)



def test_bytes_on_a_device_count_shared_buffers_once(tiny_model):
    """What a backbone already holds on a device is room for placing it again there."""
    from nextstep_core.memory import bytes_on
    from nextstep_core.fused import fused_linear
    bb, _ = load_backbone(tiny_model)
    held = sum(t.numel() * t.element_size() for t in bb.state_dict().values())
    assert bytes_on(bb, "cpu") == held and bytes_on(bb, "meta") == 0
    attn = bb.layers[0].self_attn
    fused_linear([attn.q_proj, attn.k_proj, attn.v_proj])  # q, k, v weights become views of one buffer
    assert bytes_on(bb, "cpu") == held


def test_a_capture_is_counted_and_never_makes_layers_stream():
    """The kept CUDA graph step holds a second KV cache: counted where there is room for it; where only
    it does not fit, the backbone stays whole and the image runs eagerly."""
    whole = decide("int8", 48, graphs=True)
    assert whole.streamed == 0 and whole.capture_bytes == whole.kv_bytes > 0
    assert whole.device_bytes == decide("int8", 48).device_bytes + whole.kv_bytes
    plain = decide("int8", 24)
    tight = int((plain.device_bytes + plain.kv_bytes // 2) / GiB * 1e6) / 1e6  # room for all but the capture
    eager = decide("int8", tight, graphs=True)
    assert eager.streamed == 0 and eager.capture_bytes == 0
    streamed = decide("int8", 12, graphs=True)
    assert streamed.streamed > 0 and streamed.capture_bytes == 0
    assert decide("int8", 48, graphs=True, gpu_layers=47).capture_bytes == 0
