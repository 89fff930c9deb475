"""int8 weights on a CUDA GPU, where torch's weight-only int8 kernel is no speed path.

The CUDA kernel behind `torch._weight_int8pack_mm` computes one output per thread with its
activations upcast to float32, so the CLI does not use it there (the CPU kernel is fast and stays,
see quant.py). Two replacements, chosen once per layer placement:

- `compiled`, where Triton exists: the dequantize-and-multiply is compiled by inductor for the
  few rows of a decode step (up to `DECODE_ROWS`), which lets it fuse the int8 -> bf16 conversion
  into the product instead of writing a bf16 copy of the matrix first (what gpt-fast does with the
  whole step). Each new shape compiles once; a compile failure switches the layer to `buffer`.
- `buffer`, elsewhere and for longer inputs (prefill): the matrix is converted into one scratch
  buffer per device and dtype, shared by every int8 layer there, and multiplied by the ordinary
  GEMM. The buffer lives as long as some int8 layer sits on that device, so an offload frees it.

Both compute `F.linear(x, weight.to(x.dtype)) * scale (+ bias)`, the dequantized product of
quant.py, so they differ from it only by the GEMM's own rounding. No GPU figure for either exists
yet; `bench/gpu_check.py` compares their tokens with the dequantized weights on a GPU.
"""
from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch
import torch.nn.functional as F

INT8_MATMUL_ENV = "NEXTSTEP_INT8_MATMUL"  # auto (default) | buffer | off (dequantize per call, no scratch)
DECODE_ROWS = 16  # inputs with at most this many rows take the compiled path


def choose_path(device_type: str, in_features: int, *, triton: bool, int8pack: bool, mode: str = "auto") -> str:
    """'int8pack' (torch's weight-only kernel), 'compiled', 'buffer' or 'dequantize' for a layer on
    a device of `device_type`. `int8pack`: whether that kernel passed its probe on this device."""
    mode = mode.lower()
    if device_type == "meta" or mode == "off":
        return "dequantize"
    if device_type == "cuda":
        return "compiled" if triton and mode == "auto" else "buffer"
    if int8pack and in_features % 32 == 0:  # the CPU kernel needs K % 16 for bfloat16 and crashes otherwise
        return "int8pack"
    return "dequantize"


def path_for(device: torch.device, in_features: int, int8pack_probe) -> str:
    mode = os.environ.get(INT8_MATMUL_ENV, "auto")
    triton = device.type == "cuda" and _has_triton()
    int8pack = device.type not in ("cuda", "meta") and int8pack_probe(device)
    return choose_path(device.type, in_features, triton=triton, int8pack=int8pack, mode=mode)


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
        return bool(has_triton())
    except ImportError:
        return False


class Scratch:
    """The conversion buffers of one device, one per compute dtype. Layers hold it; the registry
    holds it weakly, so it is freed with the last int8 layer that leaves the device."""

    def __init__(self):
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def view(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """A [out, in] view to convert `weight` into, or None while a CUDA graph is being captured
        and the buffer would have to grow (a graph must keep the addresses it recorded)."""
        n = weight.numel()
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < n:
            if weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            self.buffers[dtype] = buf = None  # the old one goes before the new one is made
            buf = self.buffers[dtype] = torch.empty(n, dtype=dtype, device=weight.device)
        return buf[:n].view(weight.shape)


_SCRATCH: "weakref.WeakValueDictionary[str, Scratch]" = weakref.WeakValueDictionary()


def scratch_for(device: torch.device) -> Scratch:
    key = str(device)
    found = _SCRATCH.get(key)
    if found is None:
        found = _SCRATCH[key] = Scratch()
    return found


def buffered_linear(x, weight, scale, bias, scratch: Scratch) -> torch.Tensor:
    w = scratch.view(weight, x.dtype)
    if w is None:
        w = weight.to(x.dtype)
    else:
        w.copy_(weight)
    y = F.linear(x, w) * scale  # float32: the scale adds no rounding
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def _dequantize_matmul(x, weight, scale, bias):
    y = F.linear(x, weight.to(x.dtype)) * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


@functools.lru_cache(maxsize=1)
def _compiled():
    return torch.compile(_dequantize_matmul, dynamic=False, fullgraph=True)


_SEEN: set = set()  # shapes compiled so far


def compiled_linear(x, weight, scale, bias) -> torch.Tensor:
    """Static shapes, so the decode GEMV is specialised; one graph per (rows, out, in, dtype), and
    the recompile limit raised only for a shape not seen before (a run has a handful)."""
    key = (tuple(x.shape), tuple(weight.shape), x.dtype, bias is None, str(x.device))
    if key in _SEEN:
        return _compiled()(x, weight, scale, bias)
    import torch._dynamo
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        y = _compiled()(x, weight, scale, bias)
    _SEEN.add(key)
    return y


def gpu_linear(layer, x, weight, scale, bias) -> torch.Tensor:
    """The product for an int8 layer whose path is 'compiled' or 'buffer'."""
    rows = x.numel() // x.shape[-1]
    if layer.path == "compiled" and rows <= DECODE_ROWS and not torch.compiler.is_compiling():
        try:
            return compiled_linear(x, weight, scale, bias)
        except Exception as exc:  # no working compiler here: the buffer path computes the same product
            warnings.warn(f"compiling the int8 product failed on {x.device} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); int8 layers convert into a scratch "
                          "buffer instead.")
            layer.path = "buffer"
    if torch.compiler.is_compiling():  # the engine's own compiled step fuses the conversion itself
        return _dequantize_matmul(x, weight, scale, bias)
    return buffered_linear(x, weight, scale, bias, layer.scratch)
