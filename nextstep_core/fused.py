"""Several Linears that read the same input, run as one matrix product (q|k|v, gate|up).

A decode step multiplies 2-3 rows by each matrix, so every product is a pass over its weights;
one pass over [q; k; v] replaces three (two of them small and bandwidth-poor). The checkpoint
keeps its own names: the member Linears keep their parameters, which become consecutive views of
one buffer, so no weight is held twice and the bit-parity path still runs them one by one. A
move of the model (`.to`, an offload) gives the members fresh separate storage; the next fused
call notices (by address) and lays them out together again, once.

The module that keeps a fused layout (Attention, MLP, FlowHead) drops it in its `_apply`: the
joined buffer is the old device's memory, and a memory manager that moved the module counts that
memory as freed. The members stay separate modules under the checkpoint's names (rather than
being joined at load) because a host's own layers (comfy.ops) load and cast them one by one by
those names; those are never fused here (`fused_linear` returns None for them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ATTRS = ("weight", "scale", "bias")


def _parts(mods, attr):
    ts = [getattr(m, attr, None) for m in mods]
    if all(t is None for t in ts):
        return None
    if any(t is None for t in ts):
        raise ValueError(f"mixed {attr}")
    return ts


def _adjacent(ts) -> bool:
    if not all(t.is_contiguous() and t.dtype == ts[0].dtype and t.device == ts[0].device for t in ts):
        return False
    ptr, size = ts[0].data_ptr(), ts[0].element_size()
    for t in ts:
        if t.data_ptr() != ptr or t.untyped_storage().data_ptr() != ts[0].untyped_storage().data_ptr():
            return False
        ptr += t.numel() * size
    return True


def _fused_tensor(ts):
    """One tensor over `ts` (rows stacked); the members become views of it when they are not yet."""
    if _adjacent(ts):
        base = ts[0]
        rows = sum(t.shape[0] for t in ts)
        return base.as_strided((rows,) + tuple(base.shape[1:]), base.stride())
    # the members' new storage is of the kind they had: ordinary weights must stay editable in
    # place later (weight patching) even when the first fused call ran in inference mode
    with torch.inference_mode(ts[0].is_inference()), torch.no_grad():
        buf = torch.cat([t.detach() for t in ts])
        start = 0
        for t in ts:
            t.data = buf[start:start + t.shape[0]]
            start += t.shape[0]
    return buf


def fused_linear(mods) -> nn.Module | None:
    """A module computing torch.cat([m(x) for m in mods], -1) in one product, or None when the
    members cannot be fused (different kinds, mixed biases, or a module we do not know), or when
    called first inside torch.compile (the layout is made eagerly; compiled code only reads it)."""
    if torch.compiler.is_compiling():
        return None
    kinds = {type(m) for m in mods}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    from .weights.quant import QuantLinear
    if kind is not nn.Linear and not issubclass(kind, QuantLinear):
        return None
    try:
        parts = {a: _parts(mods, a) for a in _ATTRS}
    except ValueError:
        return None
    if parts["weight"][0].device.type == "meta":
        return None
    return FusedLinear(mods, parts)


class FusedLinear:
    """Not an nn.Module on purpose: it owns nothing (the members own the weights) and must not
    show up in state dicts or device moves."""

    def __init__(self, mods, parts):
        self.mods = mods
        self.sizes = [m.weight.shape[0] for m in mods]
        self.quant = not isinstance(mods[0], nn.Linear)
        self._tensors = {a: None if ts is None else _fused_tensor(ts) for a, ts in parts.items()}

    def tensors(self) -> dict:
        """The fused weight/scale/bias, laid out again if a move split the members apart."""
        cur = self._tensors
        if torch.compiler.is_compiling():  # graphs are guarded on their inputs; addresses are not traceable
            return cur
        for a in _ATTRS:
            if cur[a] is None:
                continue
            ts = [getattr(m, a) for m in self.mods]
            if ts[0].data_ptr() != cur[a].data_ptr() or not _adjacent(ts):
                self._tensors = {b: None if cur[b] is None else _fused_tensor([getattr(m, b) for m in self.mods])
                                 for b in _ATTRS}
                break
        return self._tensors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors()
        if self.quant:
            return self.mods[0].matmul(x, t["weight"], t["scale"], t["bias"])
        return F.linear(x, t["weight"], t["bias"])

    def split(self, y: torch.Tensor):
        return y.split(self.sizes, dim=-1)


def linear_add(residual: torch.Tensor, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """residual + mod(x) for 2-D residual [rows, out] and x [rows, in] (the decode step's rows);
    for a bias-free full-precision Linear the addition rides in the GEMM (beta = 1), one kernel
    instead of two."""
    if type(mod) is nn.Linear and mod.bias is None and residual.dtype == x.dtype:
        return torch.addmm(residual, x, mod.weight.t())
    return residual + mod(x)
