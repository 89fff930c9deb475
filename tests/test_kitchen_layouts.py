"""The pack's quantized files read by comfy-kitchen, the package ComfyUI 0.33 computes quantized
layers with (its eager backend runs on a CPU): each layer built the way ComfyUI's mixed-precision
Linear builds it (comfy/ops.py `_load_quantized_module`), against the CLI's own layers. ComfyUI
itself cannot be installed here, so the layout objects are made directly; skipped without
comfy-kitchen."""
import importlib
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from host_stand_in import PACK_NAME, host, models_dir, pack  # noqa: F401
from nextstep_core.checkpoint import load_backbone
from nextstep_core.cli import main as cli_main
from bench.token_error import relative_error

ck_tensor = pytest.importorskip("comfy_kitchen.tensor")
QuantizedTensor = ck_tensor.QuantizedTensor


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    """fmt -> (the state of a file `quantize` wrote, the CLI's backbone loaded from it)."""
    import shutil
    out = {}
    folder = tmp_path_factory.mktemp("kitchen") / "model"
    shutil.copytree(tiny_model, folder)
    for fmt in ("int8", "fp8", "int4"):
        path = str(folder / f"{fmt}.safetensors")
        assert cli_main(["quantize", "--model", tiny_model, "--format", fmt, "--out", path]) == 0
        out[fmt] = load_file(path), load_backbone(path)[0]
    return out


def core_weight(fmt, state, layer, dtype=torch.float32):
    """What ComfyUI 0.33's mixed-precision Linear holds for the layer."""
    w, s = state[f"{layer}.weight"], state[f"{layer}.weight_scale"]
    name = {"int8": "TensorWiseINT8Layout", "fp8": "TensorCoreFP8Layout"}[fmt]
    params = ck_tensor.get_layout_class(name).Params(scale=s, orig_dtype=dtype, orig_shape=tuple(w.shape))
    return QuantizedTensor(w, name, params)


LAYERS = ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj")


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_comfy_kitchen_holds_the_files_weights_exactly(fmt, quantized):
    state, bb = quantized[fmt]
    for layer in LAYERS:
        ours = bb.get_submodule(layer)
        want = ours.weight.float() * ours.scale[:, None]
        assert torch.equal(core_weight(fmt, state, layer).dequantize(), want), layer


# ComfyUI's products quantize activations too: int8 per row (W8A8), fp8 per tensor with scale 1 and
# a clamp at +-448 (no input_scale in the file). Largest relative error per row against the CLI's
# dequantized product on N(0, 1) inputs, measured on the tiny model: int8 0.0080-0.0084, fp8
# 0.031-0.035; with the layer's weight scale x1.1: 0.10-0.11.
PRODUCT_BOUND = {"int8": 0.02, "fp8": 0.06}


def core_product(fmt, weight, x, bias):
    if fmt == "fp8":  # what ComfyUI 0.33 does with an fp8 layer's input when the GPU has fp8 matmuls
        one = torch.ones((), dtype=torch.float32)
        params = ck_tensor.TensorCoreFP8Layout.Params(scale=one, orig_dtype=x.dtype, orig_shape=tuple(x.shape))
        x = QuantizedTensor(x.clamp(-448, 448).to(torch.float8_e4m3fn), "TensorCoreFP8Layout", params)
    return F.linear(x, weight, bias)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_comfy_kitchens_products_stay_near_the_clis(fmt, quantized):
    state, bb = quantized[fmt]
    g = torch.Generator().manual_seed(0)
    for layer in LAYERS:
        ours = bb.get_submodule(layer)
        x = torch.randn(6, ours.in_features, generator=g)
        want = ours.dequantized(x)
        got = core_product(fmt, core_weight(fmt, state, layer), x, ours.bias)
        err = float(relative_error(got, want).max())
        assert err < PRODUCT_BOUND[fmt], (layer, err)
        wrong = dict(state)
        wrong[f"{layer}.weight_scale"] = state[f"{layer}.weight_scale"] * 1.1
        bad = float(relative_error(core_product(fmt, core_weight(fmt, wrong, layer), x, ours.bias), want).max())
        assert bad > PRODUCT_BOUND[fmt], (layer, bad)


def test_an_earlier_fp8_file_converted_for_comfyui_holds_one_scale(quantized):
    from nextstep_core.weights.convention import from_earlier, layer_entry, to_core
    state, bb = quantized["fp8"]
    layer = "layers.0.mlp.up_proj"
    w = state[f"{layer}.weight"].float() * state[f"{layer}.weight_scale"]
    rows = w.abs().amax(dim=1) / 448  # the pack's earlier per-row fp8
    # the nodes' path for an earlier file's matrix: read_stored (from_earlier), then to_core
    stored = to_core("fp8", from_earlier("fp8", (w / rows[:, None]).to(torch.float8_e4m3fn), rows))
    assert layer_entry("fp8", stored) == {"format": "float8_e4m3fn"}
    assert stored["weight_scale"].shape == ()
    converted = {f"{layer}.weight": stored["weight"], f"{layer}.weight_scale": stored["weight_scale"]}
    held = core_weight("fp8", converted, layer).dequantize()
    assert float(relative_error(held, w).max()) < 0.05  # two roundings to e4m3 instead of one


@pytest.fixture
def int4_layout(pack, host):  # noqa: F811
    return importlib.import_module(f"{PACK_NAME}.nodes.int4_layout")


def test_the_int4_layout_computes_the_clis_int4(int4_layout, quantized):
    state, bb = quantized["int4"]
    for layer in LAYERS:
        ours = bb.get_submodule(layer)
        qt = int4_layout.quantized_weight(state[f"{layer}.weight"], state[f"{layer}.weight_scale"], torch.float32)
        x = torch.randn(2, 3, ours.in_features)
        want = ours.dequantized(x)
        assert torch.equal(F.linear(x, qt, ours.bias), want)  # the layout's own product, not a fallback
        bias = 0 if ours.bias is None else ours.bias
        # x @ W.t() as a decomposed linear reaches the layout too (the bias added apart: last bits only)
        torch.testing.assert_close(torch.mm(x[0], qt.t()) + bias, want[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(qt.dequantize(), (ours.dequantized(torch.eye(ours.in_features)) - bias).t(),
                                   rtol=1e-6, atol=1e-6)
        assert set(qt.state_dict("weight")) == {"weight", "weight_scale"}
        moved = qt.to("meta")
        assert isinstance(moved, QuantizedTensor) and moved._qdata.device.type == "meta"


def test_int4_registration_needs_comfyui_and_is_idempotent(int4_layout, monkeypatch):
    without = types.ModuleType("comfy.quant_ops")  # core installed without comfy-kitchen: no layouts at all
    without._CK_AVAILABLE = False
    monkeypatch.setitem(sys.modules, "comfy.quant_ops", without)
    assert int4_layout.register() is False
    with pytest.raises(RuntimeError, match="int4 weights need ComfyUI with comfy-kitchen"):
        int4_layout.with_int4(object)
    quant_ops = types.ModuleType("comfy.quant_ops")  # what ComfyUI 0.33's module offers the layout
    quant_ops._CK_AVAILABLE = True
    quant_ops.register_layout_class = ck_tensor.register_layout_class
    quant_ops.QUANT_ALGOS = {}
    monkeypatch.setitem(sys.modules, "comfy.quant_ops", quant_ops)
    monkeypatch.setattr(sys.modules["comfy"], "quant_ops", quant_ops, raising=False)
    assert int4_layout.register() is True and int4_layout.register() is True
    assert quant_ops.QUANT_ALGOS["nextstep_int4"]["quantize_input"] is False  # core takes the weight-only path
    assert ck_tensor.get_layout_class("NextStepInt4Layout") is int4_layout.layout_class()


def test_int4_layers_load_into_a_host_linear(int4_layout, quantized, monkeypatch):
    """`with_int4` on a stand-in for the ops class: the int4 layer's keys become the layout, every
    other layer goes to the base class's loading."""
    quant_ops = types.ModuleType("comfy.quant_ops")
    quant_ops._CK_AVAILABLE, quant_ops.register_layout_class, quant_ops.QUANT_ALGOS = True, ck_tensor.register_layout_class, {}
    monkeypatch.setitem(sys.modules, "comfy.quant_ops", quant_ops)
    monkeypatch.setattr(sys.modules["comfy"], "quant_ops", quant_ops, raising=False)

    class Ops:
        class Linear(torch.nn.Module):
            def __init__(self, in_features, out_features, bias=True):
                super().__init__()
                self.factory_kwargs = {"device": None, "dtype": torch.float32}
                self.weight = torch.nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
                self.bias = torch.nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

            def forward(self, x):
                return F.linear(x, self.weight, self.bias)

    state, bb = quantized["int4"]
    ours = bb.get_submodule("layers.0.self_attn.q_proj")
    lin = int4_layout.with_int4(Ops).Linear(ours.in_features, ours.out_features)
    layer = "layers.0.self_attn.q_proj"
    sd = {k[len(layer) + 1:]: v for k, v in state.items() if k.startswith(layer + ".")}
    sd["comfy_quant"] = torch.tensor(list(json.dumps({"format": "nextstep_int4"}).encode()), dtype=torch.uint8)
    result = lin.load_state_dict(sd, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert lin.weight._layout_cls == "NextStepInt4Layout" and lin.quant_format == "nextstep_int4"
    x = torch.randn(4, ours.in_features)
    assert torch.equal(lin(x), ours.dequantized(x))
    plain = int4_layout.with_int4(Ops).Linear(8, 4)
    w = torch.randn(4, 8)
    plain.load_state_dict({"weight": w, "bias": torch.zeros(4)})
    assert torch.equal(plain.weight, w)
