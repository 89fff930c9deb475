"""The pack's group-wise int4 as a ComfyUI weight layout, so int4 decoder matrices are held by
comfy.ops layers as QuantizedTensors and paged by core like its own formats.

What ComfyUI 0.33 allows (read from comfy/quant_ops.py, comfy/ops.py, comfy/memory_management.py
and comfy-kitchen 0.2.31's tensor/base.py):
- A QuantizedTensor dispatches on its layout class; `register_layout_class` and
  `register_layout_op` add one. comfy.ops' mixed-precision Linear then runs it like the built-in
  formats: with `quantize_input` False in QUANT_ALGOS it takes the weight-only path, and
  `F.linear(x, weight)` reaches this layout's handlers (t, mm, addmm, linear).
- Moving, copying and paging are layout-blind: `.to()`, clone and copy_ are kitchen's generic
  handlers, and core's cast buffers, pinned pool and memory-mapped reads move a QuantizedTensor
  through `__tensor_flatten__` (its data plus the tensor fields of its params).
- Loading is not open: `_load_quantized_module` reads each known format's scales in a fixed
  if/elif chain and raises for any other format. So `with_int4(ops)` gives a Linear subclass whose
  `_load_from_state_dict` takes the layers declared `nextstep_int4` and hands every other layer
  to core's own loader unchanged.

The file side is the pack's (`python -m nextstep_core quantize --format int4`): `<layer>.weight`
uint8 [out, in/2] and `<layer>.weight_scale` bf16 [in/group, out, 2], declared in the header's
`_quantization_metadata` with {"format": "nextstep_int4", "group_size": 128}.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import torch

from ..nextstep_core.api import INT4_GROUP as GROUP, int4_dequantize as dequantize, quantize_int4, stored_linear
from . import bridge

LAYOUT = "NextStepInt4Layout"
FORMAT = "nextstep_int4"
ALGO = {"storage_t": torch.uint8, "parameters": {"weight_scale"}, "comfy_tensor_layout": LAYOUT,
        "quantize_input": False}


@functools.lru_cache(maxsize=1)
def layout_class():
    """The layout, built on comfy-kitchen alone (ImportError without it) and registered with
    kitchen's dispatcher here, once: the layout by name (ComfyUI's `register_layout_class` is this
    same registry) and its ops."""
    from comfy_kitchen.tensor import QuantizedLayout, QuantizedTensor, register_layout_class, register_layout_op
    from comfy_kitchen.tensor.base import BaseLayoutParams, dequantize_args

    class NextStepInt4Layout(QuantizedLayout):
        """qdata: uint8 [out, in/2]; params.scale: the bf16 [in/group, out, 2] scale/zero pairs."""

        @dataclasses.dataclass(frozen=True)
        class Params(BaseLayoutParams):
            group_size: int = GROUP
            transposed: bool = False

        @classmethod
        def quantize(cls, tensor, group_size: int = GROUP, **_ignored):
            """Also what core calls to requantize after merging a LoRA (it passes scale= and
            stochastic_rounding=, which min/max int4 does not use)."""
            packed, sz = quantize_int4(tensor, group_size)
            return packed, cls.Params(scale=sz, orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape),
                                      group_size=group_size)

        @classmethod
        def dequantize(cls, qdata, params):
            return dequantize(qdata, params.scale, params.orig_dtype)

        @classmethod
        def get_plain_tensors(cls, qtensor):
            return qtensor._qdata, qtensor._params.scale

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            return {"": qdata, "_scale": params.scale}

        @classmethod
        def requantize_kwargs(cls, qtensor):
            return {"group_size": qtensor._params.group_size}

    def ours(t) -> bool:
        return isinstance(t, QuantizedTensor) and t._layout_cls == LAYOUT

    def product(x, weight, bias):
        if isinstance(x, QuantizedTensor):
            x = x.dequantize()
        qdata, sz = NextStepInt4Layout.get_plain_tensors(weight)
        return stored_linear(x, qdata, sz, bias)

    @register_layout_op(torch.ops.aten.t.default, NextStepInt4Layout)
    def _t(qt, args, kwargs):
        t = args[0]
        if not ours(t):
            return torch.ops.aten.t.default(*args, **kwargs)
        p = t._params
        flipped = dataclasses.replace(p, orig_shape=(p.orig_shape[1], p.orig_shape[0]), transposed=not p.transposed)
        return QuantizedTensor(t._qdata, LAYOUT, flipped)

    @register_layout_op(torch.ops.aten.linear.default, NextStepInt4Layout)
    def _linear(qt, args, kwargs):
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not ours(w) or w._params.transposed or ours(x):
            return torch.nn.functional.linear(*dequantize_args((x, w, bias)))
        return product(x, w, bias)

    @register_layout_op(torch.ops.aten.mm.default, NextStepInt4Layout)
    def _mm(qt, args, kwargs):
        x, w = args[0], args[1]
        if not ours(w) or not w._params.transposed or ours(x):  # only x @ W.t() is a linear
            return torch.mm(*dequantize_args(args), **dequantize_args(kwargs))
        return product(x, w, None)

    @register_layout_op(torch.ops.aten.addmm.default, NextStepInt4Layout)
    def _addmm(qt, args, kwargs):
        bias, x, w = args[0], args[1], args[2]
        plain = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and not ours(bias)
        if not ours(w) or not w._params.transposed or ours(x) or not plain or bias.dim() != 1:
            return torch.addmm(*dequantize_args(args), **dequantize_args(kwargs))
        return product(x, w, bias)

    register_layout_class(LAYOUT, NextStepInt4Layout)
    return NextStepInt4Layout


def quantized_weight(qdata: torch.Tensor, scale: torch.Tensor, compute_dtype, device=None):
    """A QuantizedTensor of this layout from a file's `weight` and `weight_scale`."""
    from comfy_kitchen.tensor import QuantizedTensor
    cls = layout_class()
    qdata = qdata.to(device=device, dtype=torch.uint8)
    scale = scale.to(device=device, dtype=torch.bfloat16)
    out_f, in_f = qdata.shape[0], qdata.shape[1] * 2
    params = cls.Params(scale=scale, orig_dtype=compute_dtype, orig_shape=(out_f, in_f),
                        group_size=in_f // scale.shape[0])
    return QuantizedTensor(qdata, LAYOUT, params)


def register() -> bool:
    """Register the layout with ComfyUI (and comfy-kitchen); True when it worked. Safe to call
    again: registration is by name, and the ops are registered once."""
    quant_ops = bridge.quant_ops()
    if quant_ops is None or not getattr(quant_ops, "_CK_AVAILABLE", False):  # core without comfy-kitchen has no layouts at all
        return False
    try:
        cls = layout_class()
    except ImportError:
        return False
    quant_ops.register_layout_class(LAYOUT, cls)
    quant_ops.QUANT_ALGOS.setdefault(FORMAT, dict(ALGO))
    return True


def _format_of(conf: torch.Tensor) -> str | None:
    try:
        return json.loads(bytes(conf.to(torch.uint8).tolist()).decode("utf-8")).get("format")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None


def with_int4(ops):
    """`ops` (a comfy.ops mixed-precision operations class) with a Linear that also loads layers
    declared `nextstep_int4`; every other layer goes through core's own loading, unchanged."""
    if not register():
        raise RuntimeError("int4 weights need ComfyUI with comfy-kitchen (the comfy-kitchen package ComfyUI "
                           "requires): update ComfyUI's requirements, or choose int8 weights.")
    base = ops.Linear

    class Linear(base):
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            conf = state_dict.get(prefix + "comfy_quant")
            if conf is None or _format_of(conf) != FORMAT:
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                     unexpected_keys, error_msgs)
            names = [prefix + n for n in ("comfy_quant", "weight", "weight_scale")]
            if names[2] not in state_dict or names[1] not in state_dict:
                error_msgs.append(f"{prefix.rstrip('.')} is declared {FORMAT} but lacks its weight or weight_scale")
                return
            state_dict.pop(names[0])
            qdata, scale = state_dict.pop(names[1]), state_dict.pop(names[2])
            kwargs = getattr(self, "factory_kwargs", {})
            self.weight = torch.nn.Parameter(quantized_weight(qdata, scale, kwargs.get("dtype") or torch.bfloat16,
                                                              kwargs.get("device")), requires_grad=False)
            self.quant_format, self.layout_type = FORMAT, LAYOUT
            torch.nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                                  unexpected_keys, error_msgs)  # the bias
            for name in names:
                if name in missing_keys:
                    missing_keys.remove(name)

    return type(f"{ops.__name__}WithInt4", (ops,), {"Linear": Linear})
