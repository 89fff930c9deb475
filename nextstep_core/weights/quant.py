"""Weight-only int8 and fp8 linears for the backbone's decoder layers, and what every weight format
shares (the format names, the module table, `format_of`); int4's own linear is in int4.py.

Decoding is bound by reading weights, so halving their bytes halves the floor of every token step.
Only the seven matrices of each decoder layer are quantized (88% of the bytes at 14B); the
embedding, norms, image projectors, LM head and the flow head stay in full precision because
they are small, or (the projectors and the head) feed the sampler directly, where CFG magnifies
any error.

Scales are float32 so they add no rounding of their own: int8 has one per output channel
(absmax), fp8 one per matrix (ComfyUI's float8_e4m3fn format; held here as a per-row vector of
equal values, so files in the pack's earlier per-row fp8 layout load unchanged). The file layout
is ComfyUI's (convention.py). int8 runs as torch's weight-only int8 kernel
(`torch._weight_int8pack_mm`: the int8 matrix is read once, 1 byte per weight, and scaled in the
kernel) on the CPU, where it passed a probe; on CUDA, whose version of that kernel is naive, as a
compiled or buffered dequantize-and-multiply (int8_gpu.py). fp8 runs as an fp8 x fp8
`torch._scaled_mm` with per-row activation scales where the GPU has that kernel. Everywhere else
both dequantize on the fly (`weight.to(x.dtype)`).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import kernel_agrees
from ..errors import SettingsError
from .int8_gpu import gpu_linear, path_for, scratch_for

FORMATS = ("int8", "fp8", "int4")  # int4: group-wise, in int4.py
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FP8_MATMUL_ENV = "NEXTSTEP_FP8_MATMUL"  # auto (default) | off | on (also where no capability check applies: tests)
_CHUNK = 1 << 22  # elements quantized at a time, so the float32 copy of a 14B MLP matrix never exists whole


def check_format(fmt) -> str:
    if fmt not in FORMATS:
        raise SettingsError(f"Unknown weight format {fmt!r}: use one of {', '.join(FORMATS)} (or none for full "
                            "precision).")
    return fmt


def check_device(fmt: str, device) -> None:
    if fmt == "fp8" and torch.device(device).type == "mps":
        from ..errors import DeviceError
        raise DeviceError("Apple MPS has no float8 tensors, so fp8 weights cannot be used there: choose int8.")


def quantize_weight(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q [out, in] in the storage dtype, scale [out] float32) with w ~= q * scale[:, None].

    int8: one absmax scale per output row. fp8: one scale for the whole matrix (repeated per row
    here, so both formats share the kernels), as ComfyUI's float8_e4m3fn format stores it: the same
    file then serves ComfyUI and the CLI. `fmt` was checked where the user gave it (the loader)."""
    q = torch.empty(w.shape, dtype=STORAGE[fmt], device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    rows = max(1, _CHUNK // max(1, w.shape[1]))
    qmax = QMAX[fmt]
    if fmt == "fp8":
        amax = max((float(w[r:r + rows].abs().amax()) for r in range(0, w.shape[0], rows)), default=0.0)
        whole = torch.tensor(amax, dtype=torch.float32) / qmax if amax > 0 else torch.ones((), dtype=torch.float32)
        scale.fill_(float(whole))
    for r in range(0, w.shape[0], rows):
        part = w[r:r + rows].to(torch.float32)
        if fmt == "fp8":
            s = scale[r:r + rows]
        else:
            amax = part.abs().amax(dim=1)
            s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))  # an all-zero row stays exactly zero
        v = (part / s[:, None]).clamp_(-qmax, qmax)
        q[r:r + rows] = v.round_() if fmt == "int8" else v
        scale[r:r + rows] = s
    return q, scale


class QuantLinear(nn.Module):
    """A Linear whose weight is 8-bit with a float32 scale per output row; the bias stays in
    the compute dtype. State-dict names are the Linear's plus `scale`."""

    fmt = ""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)  # a parameter: whatever moves weights moves it too
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._configure()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "QuantLinear":
        q, scale = quantize_weight(linear.weight.detach(), cls.fmt)
        return cls(q, scale, None if linear.bias is None else linear.bias.detach())

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> "QuantLinear":
        """Placeholders to load a pre-quantized file into (usually on the meta device)."""
        return cls(torch.empty(out_features, in_features, dtype=STORAGE[cls.fmt], device=device),
                   torch.empty(out_features, dtype=torch.float32, device=device),
                   torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def _configure(self) -> None:
        """Pick the kernel for the weight's current device; runs when it moves, never per call."""

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` would cast an fp8 weight and the float32 scale: only the
        # device changes for them, found by sending an empty float tensor through `fn`.
        target = fn(torch.empty(0, device=self.scale.device, dtype=torch.float32)).device
        self.weight = nn.Parameter(self.weight.to(target), requires_grad=False)
        self.scale = nn.Parameter(self.scale.to(target), requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias), requires_grad=False)
        self._configure()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._configure()  # `load_state_dict(assign=True)` moves the weight without `_apply`

    def dequantized(self, x: torch.Tensor) -> torch.Tensor:
        return dequantized_linear(x, self.weight, self.scale, self.bias)

    def matmul(self, x, weight, scale, bias) -> torch.Tensor:
        """x @ (weight * scale).T + bias with this module's kernel choice; the tensors are given
        so that fused groups (q|k|v, gate|up: fused.py) run through the same kernel."""
        return dequantized_linear(x, weight, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    fmt = "int8"

    def _configure(self) -> None:
        """Pick the product for the weight's device: torch's weight-only kernel where it passed its
        probe (CPU), a compiled or buffered dequantize-and-multiply on CUDA (int8_gpu.py)."""
        self.path = path_for(self.weight.device, self.in_features, int8_matmul_available)
        self.scratch = scratch_for(self.weight.device) if self.path in ("compiled", "buffer") else None
        self._scales = {}

    @property
    def int8_mm(self) -> bool:
        return self.path == "int8pack"

    def matmul(self, x, weight, scale, bias) -> torch.Tensor:
        if self.path == "int8pack" and x.dtype in INT8_MM_DTYPES:
            key = (scale.data_ptr(), scale.numel(), x.dtype)
            hit = self._scales.get(key)
            if hit is None:  # the kernel takes the scales in the activation dtype: cast once, not per call
                hit = self._scales[key] = (scale, scale.to(x.dtype))  # holding `scale` keeps its address unique
            return int8_linear(x, weight, hit[1], bias)
        if self.path in ("compiled", "buffer"):
            return gpu_linear(self, x, weight, scale, bias)
        return dequantized_linear(x, weight, scale, bias)


class Fp8Linear(QuantLinear):
    fmt = "fp8"

    def _configure(self) -> None:
        self.scaled_mm = (self.in_features % 16 == 0 and self.out_features % 16 == 0
                          and fp8_matmul_available(self.weight.device))

    def matmul(self, x, weight, scale, bias) -> torch.Tensor:
        if self.scaled_mm and x.dtype == torch.bfloat16:
            return fp8_linear(x, weight, scale, bias)
        return dequantized_linear(x, weight, scale, bias)


def dequantized_linear(x, weight, scale, bias=None) -> torch.Tensor:
    y = F.linear(x, weight.to(x.dtype)) * scale  # float32: the scale adds no rounding
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


INT8_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def int8_linear(x, weight, scale, bias=None) -> torch.Tensor:
    """Weight-only int8 product; `scale` [out] in x's dtype."""
    shape = x.shape
    y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), weight, scale)
    if bias is not None:
        y = y + bias
    return y.view(*shape[:-1], weight.shape[0])


def int8_matmul_available(device: torch.device) -> bool:
    """Whether torch's weight-only int8 kernel runs correctly on `device` (never asked for CUDA,
    whose kernel is slow: int8_gpu.py)."""
    if device.type in ("meta", "cuda") or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return _probe_int8(device.type, index)


@functools.lru_cache(maxsize=None)
def _probe_int8(kind: str, index: int) -> bool:
    """Run the kernel once per device on a small problem (K a multiple of 32: the CPU kernel
    needs K % 16 == 0 for bfloat16 and crashes otherwise, so only such layers use it) and
    compare with the dequantized product."""
    device = torch.device(kind, index) if kind in ("cuda", "xpu") else torch.device(kind)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen)
    q, scale = quantize_weight(w, "int8")
    q, scale = q.to(device), scale.to(device)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 64, generator=gen).to(device=device, dtype=dtype)
        try:
            fast = int8_linear(x, q, scale.to(dtype)).float()
        except (RuntimeError, NotImplementedError):
            return False
        ref = dequantized_linear(x.float(), q, scale)
        if not float((fast - ref).abs().max() / ref.abs().max()) < 0.02:
            warnings.warn(f"the int8 weight-only kernel on {device} disagrees with the dequantized product on a "
                          "probe; int8 weights will be dequantized per layer instead (slower).")
            return False
    return True


def fp8_linear(x, weight, scale, bias=None) -> torch.Tensor:
    """fp8 x fp8 with one scale per activation row: M (decode: 2-3 CFG rows) is padded to 16,
    which `_scaled_mm` requires and a bandwidth-bound GEMV gets for free."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if m % 16:
        x2 = F.pad(x2, (0, 0, 0, 16 - m % 16))
    x32 = x2.to(torch.float32)
    scale_a = (x32.abs().amax(dim=1, keepdim=True) / QMAX["fp8"]).clamp_(min=1e-12)  # [M, 1]
    xq = (x32 / scale_a).clamp_(-QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn)  # row-major
    y = torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale.view(1, -1),  # weight.t(): column-major
                         out_dtype=torch.bfloat16)[:m]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


from .int4 import Int4Linear  # noqa: E402  (int4.py imports nothing from here)

MODULES = {"int8": Int8Linear, "fp8": Fp8Linear, "int4": Int4Linear}
QUANTIZED = (QuantLinear, Int4Linear)


def fp8_matmul_available(device: torch.device) -> bool:
    mode = os.environ.get(FP8_MATMUL_ENV, "auto").lower()
    if mode == "off" or device.type == "meta" or not hasattr(torch, "_scaled_mm"):
        return False
    if mode == "on":
        return True
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe_cuda(index)


@functools.lru_cache(maxsize=None)
def _probe_cuda(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9) and probe_fp8_matmul(torch.device("cuda", index))


def probe_fp8_matmul(device: torch.device) -> bool:
    """The row-wise fp8 kernel exists from SM 8.9 on, but not on every build or architecture:
    run it once on a small problem and compare with the dequantized product."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(3, 64, device=device, generator=gen).to(torch.bfloat16)
    q, scale = quantize_weight(torch.randn(32, 64, device=device, generator=gen), "fp8")
    return kernel_agrees("fp8", device, lambda: fp8_linear(x, q, scale), dequantized_linear(x.float(), q, scale), 0.1)


def empty_quantized_layers(backbone: nn.Module, fmt: str) -> None:
    """Replace the seven Linears of every layer with placeholders of the right storage dtypes,
    for `load_state_dict(assign=True)` of a pre-quantized file."""
    cls = MODULES[fmt]
    for layer in backbone.layers:
        for path in LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, name)
            setattr(parent, name, cls.empty(old.in_features, old.out_features, old.bias is not None,
                                            device=old.weight.device))


def format_of(backbone: nn.Module) -> str | None:
    """'int8' / 'fp8' / 'int4' for a quantized backbone, None for full precision."""
    first = backbone.layers[0].self_attn.q_proj if len(backbone.layers) else None
    return first.fmt if isinstance(first, QUANTIZED) else None


def quantized_names(module: nn.Module) -> set[str]:
    """State-dict names whose stored dtype is the data itself (quantized weights and their scales)."""
    return {f"{n}.{t}" if n else t for n, m in module.named_modules() if isinstance(m, QUANTIZED)
            for t in ("weight", "scale")}
