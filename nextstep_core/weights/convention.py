"""ComfyUI's convention for quantized layers, which the pack's files follow, so that one file
serves ComfyUI (comfy.ops' mixed-precision layers) and the CLI.

A file declares its quantized layers in its safetensors header: `_quantization_metadata` =
`{"format_version": "1.0", "layers": {"layers.0.self_attn.q_proj": {"format": ...}, ...}}`.
Each such layer stores `<layer>.weight` and `<layer>.weight_scale` (ComfyUI 0.33, comfy/ops.py
`_load_quantized_module`):

- int8 -> `int8_tensorwise`: int8 [out, in] and a float32 scale [out, 1], one per output channel
  (comfy-kitchen's TensorWiseINT8Layout; ComfyUI quantizes activations per row at run time, W8A8,
  while the CLI multiplies with the int8 weights directly).
- fp8 -> `float8_e4m3fn`: float8_e4m3fn [out, in] and one float32 scale [] for the matrix (ComfyUI
  scales activations by `input_scale`, 1 when absent, clamping at +-448).
- int4 -> `nextstep_int4`, the pack's own group-wise format (not one of ComfyUI's; its layout is
  registered by nodes/int4_layout.py): uint8 [out, in/2] (column 2j in the high nibble) and the
  bf16 [in/group, out, 2] scale/zero pairs as `weight_scale`; the layer entry names `group_size`.

The pack's earlier files (`<layer>.scale`, no `_quantization_metadata`) are read through
`from_earlier`, which changes names and shapes only (per-row fp8 scales stay per row for the CLI;
`to_core` requantizes them per matrix where ComfyUI's format is needed).

"Stored" below is one matrix in this convention: {"weight": ..., "weight_scale": ...}. Quantizing
while loading and reading a file both produce it, and both build the module from it
(`module_from_stored`), so the two give the same layer bit for bit.
"""
from __future__ import annotations

import json

import torch
from torch import nn

from ..errors import CheckpointError, SettingsError
from .int4 import group_size, quantize_int4
from .quant import LINEARS, MODULES, QMAX, QUANTIZED, check_format, quantize_weight

META_KEY = "_quantization_metadata"
CORE_FORMAT = {"int8": "int8_tensorwise", "fp8": "float8_e4m3fn", "int4": "nextstep_int4"}
SCALE = "weight_scale"
EARLIER_SCALE = "scale"
STORED_DTYPES = {"int8": (torch.int8, torch.float32), "fp8": (torch.float8_e4m3fn, torch.float32),
                 "int4": (torch.uint8, torch.bfloat16)}


def quantize_stored(w: torch.Tensor, fmt: str) -> dict:
    """A full-precision matrix [out, in] -> its stored tensors, on w's device."""
    if fmt == "int4":
        packed, sz = quantize_int4(w, group_size(w.shape[1]))
        return {"weight": packed, SCALE: sz}
    q, scale = quantize_weight(w, fmt)
    return {"weight": q, SCALE: scale[0].clone() if fmt == "fp8" else scale.view(-1, 1)}


def layer_entry(fmt: str, stored: dict) -> dict:
    """The layer's entry in `_quantization_metadata`."""
    entry = {"format": CORE_FORMAT[fmt]}
    if fmt == "int4":
        entry["group_size"] = stored["weight"].shape[1] * 2 // stored[SCALE].shape[0]
    return entry


def module_from_stored(fmt: str, stored: dict, bias: torch.Tensor | None):
    """The CLI's module for one stored matrix (tensors used as they are: no copy, no rounding)."""
    weight, scale = stored["weight"], stored[SCALE]
    if fmt == "int4":
        return MODULES[fmt](weight, scale, bias)
    out = weight.shape[0]
    if scale.numel() == 1:
        scale = scale.reshape(1).expand(out).clone()  # one scale per matrix, held per row
    elif scale.numel() == out:
        scale = scale.reshape(out)
    else:
        raise CheckpointError(f"a {fmt} scale of shape {tuple(scale.shape)} does not fit a matrix with {out} rows: "
                              "the file is damaged or in a layout this version does not know. Make it again.")
    return MODULES[fmt](weight, scale.to(torch.float32), bias)


def quantize_layer(layer: nn.Module, fmt: str) -> nn.Module:
    """Swap a decoder layer's seven Linears for quantized ones; each original is dropped as soon as
    its replacement exists, so the extra memory is one matrix, not one layer. Each goes through its
    stored form, as a file's matrices do, so this gives a file's layers exactly."""
    for path in LINEARS:
        parent_name, name = path.split(".")
        parent = getattr(layer, parent_name)
        old = getattr(parent, name)
        if isinstance(old, QUANTIZED):
            raise SettingsError(f"This layer is already quantized ({old.fmt}); load the full-precision weights to "
                                f"quantize them as {fmt}.")
        bias = None if old.bias is None else old.bias.detach()
        setattr(parent, name, module_from_stored(fmt, quantize_stored(old.weight.detach(), fmt), bias))
        del old
    return layer


def quantize_backbone(backbone: nn.Module, fmt: str) -> nn.Module:
    """In place, layer by layer; the LM head, embeddings, norms and projectors stay as they are."""
    check_format(fmt)
    for layer in backbone.layers:
        quantize_layer(layer, fmt)
    return backbone


def host_module_from_stored(linear_class, fmt: str, stored: dict, bias: torch.Tensor | None, in_features: int,
                            out_features: int):
    """A host's Linear (ComfyUI's mixed-precision comfy.ops layer) for one stored matrix, loaded from
    the state a file in this convention gives it after ComfyUI turns the header's entry into the
    layer's `comfy_quant` bytes; the host then holds the weights as its own quantized tensors."""
    core = to_core(fmt, stored)
    entry = json.dumps(layer_entry(fmt, core)).encode("utf-8")
    state = {"weight": core["weight"], SCALE: core[SCALE],
             "comfy_quant": torch.tensor(list(entry), dtype=torch.uint8)}
    if bias is not None:
        state["bias"] = bias
    with torch.device("meta"):
        module = linear_class(in_features, out_features, bias=bias is not None)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def stored_from_module(module) -> dict:
    """The stored tensors of a quantized module, for writing in ComfyUI's convention."""
    fmt = module.fmt
    if fmt == "int4":
        return {"weight": module.stored_weight(), SCALE: module.scale.data}
    scale = module.scale.data
    if fmt == "int8":
        return {"weight": module.weight.data, SCALE: scale.view(-1, 1)}
    return to_core(fmt, {"weight": module.weight.data, SCALE: scale.view(-1, 1)})


def from_earlier(fmt: str, weight: torch.Tensor, scale: torch.Tensor) -> dict:
    """One matrix of the pack's earlier files (`weight`, `scale` [out] or int4's pairs) -> stored."""
    return {"weight": weight, SCALE: scale if fmt == "int4" else scale.reshape(-1, 1)}


def to_core(fmt: str, stored: dict) -> dict:
    """`stored` in the form ComfyUI reads: a per-row fp8 scale (the pack's earlier fp8) becomes one
    scale per matrix, the weights requantized to it; everything else is returned unchanged."""
    scale = stored[SCALE]
    if fmt != "fp8":
        return stored
    first = scale.reshape(-1)[0]
    if bool((scale == first).all()):  # one scale already, held per row
        return {"weight": stored["weight"], SCALE: first.clone()}
    rows = stored["weight"].to(torch.float32) * scale.reshape(-1, 1).to(torch.float32)
    amax = float(rows.abs().amax())
    whole = torch.tensor(amax / QMAX[fmt] if amax > 0 else 1.0, dtype=torch.float32)
    q = (rows / whole).clamp_(-QMAX[fmt], QMAX[fmt]).to(torch.float8_e4m3fn)
    return {"weight": q, SCALE: whole.to(scale.device)}


def metadata_entry(layers: dict) -> str:
    """The `_quantization_metadata` header value for {layer name: entry}."""
    return json.dumps({"format_version": "1.0", "layers": layers}, sort_keys=True)


def declared_layers(metadata: dict) -> dict:
    """{layer name: entry} from a header's metadata, {} when it declares none."""
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        return {}
    try:
        layers = json.loads(raw)["layers"]
        assert isinstance(layers, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"the header's {META_KEY} entry is not readable JSON with a 'layers' table: the file "
                              "is damaged. Make it again.") from None
    return layers

