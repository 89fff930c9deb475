"""Weight-only int4 linears for the backbone's decoder matrices (half the bytes of int8).

Decoding reads every weight once per token, so 4-bit weights lower the floor of a token step
below int8's, and a 14B decoder (13.2B matrix parameters) fits in about 7 GB. Scales and zeros are
per group of `GROUP` input columns (asymmetric min/max, as gpt-fast and torchao's int4 weight-only
do), stored as bfloat16 pairs in the [groups, out, 2] layout torch's int4 kernels read.

Stored form (state dict, pre-quantized files): `weight` uint8 [out, in/2], column 2j in the high
nibble and 2j+1 in the low one (the input of torch's CUDA packing op), `scale` bf16 [in/G, out, 2]
(scale, zero) with w ~= (q - 8) * scale + zero. On a device with a kernel the weight is repacked
once into that kernel's tiled layout (replacing it: no second copy exists), and unpacked again
when it leaves the device or is saved. The CUDA layout is unpacked by running the kernel itself on
an identity matrix with scale 1 and zero 8, which returns q exactly; the CPU layout, a fixed
permutation within blocks of 64 rows, by that permutation (found once by packing indices).

Kernels (chosen once per device): `_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on
CUDA with SM 8.0 or newer (checked on a probe); elsewhere (older GPUs, MPS) the weight is
dequantized per call. Both kernels take bfloat16 activations, so a float32 model rounds its
activations to bf16 on the way in: that is far below int4's own error, and on CPU the bf16
kernel is ~80x faster than its float32 form (bench figures in docs/benchmarks.md).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import kernel_agrees

GROUP = 128
INT4_MATMUL_ENV = "NEXTSTEP_INT4_MATMUL"  # auto (default) | off (always dequantize)
_CHUNK = 1 << 22  # elements quantized at a time: a float32 copy of a whole 14B matrix never exists


def group_size(in_features: int) -> int:
    """GROUP where it divides the row; smaller powers of two for narrow (test-size) layers."""
    for g in (GROUP, 64, 32, 16):
        if in_features % g == 0:
            return g
    from ..errors import SettingsError
    raise SettingsError(f"int4 needs the input width to be a multiple of 16, and this layer has {in_features}: "
                        "use int8 for this model.")


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed uint8 [out, in/2], scale_zero bf16 [in/group, out, 2])."""
    out_f, in_f = w.shape
    packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8, device=w.device)
    sz = torch.empty(in_f // group, out_f, 2, dtype=torch.bfloat16, device=w.device)
    rows = max(1, _CHUNK // max(1, in_f))
    for r in range(0, out_f, rows):
        part = w[r:r + rows].to(torch.float32).reshape(-1, in_f // group, group)
        lo, hi = part.amin(dim=2), part.amax(dim=2)
        scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)  # rounded first, so q is chosen against what is stored
        s32, z32 = scale.float()[..., None], zero.float()[..., None]
        q = ((part - z32) / s32 + 8).round_().clamp_(0, 15).to(torch.uint8).reshape(part.shape[0], in_f)
        packed[r:r + rows] = (q[:, 0::2] << 4) | q[:, 1::2]
        sz[:, r:r + rows, 0] = scale.t()
        sz[:, r:r + rows, 1] = zero.t()
    return packed, sz


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> the 4-bit values 0..15 as uint8 [out, in]."""
    q = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    q[:, 0::2] = packed >> 4
    q[:, 1::2] = packed & 15
    return q


def dequantize(packed: torch.Tensor, sz: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The stored form back to a float matrix [out, in], exactly as the kernels compute it."""
    q = unpack(packed).to(torch.float32)
    groups = sz.shape[0]
    q = q.reshape(q.shape[0], groups, -1)
    scale = sz[..., 0].t().float()[..., None]
    zero = sz[..., 1].t().float()[..., None]
    return ((q - 8) * scale + zero).reshape(packed.shape[0], -1).to(dtype)


def inner_k_tiles(in_features: int) -> int | None:
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


def kernel_for(device: torch.device) -> str | None:
    """'cpu' / 'cuda' where torch's int4 kernel runs on `device`, None to dequantize."""
    if os.environ.get(INT4_MATMUL_ENV, "auto").lower() == "off":
        return None
    if device.type == "cpu":
        return "cpu" if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "cuda" if _probe_cuda(index) else None
    return None


@functools.lru_cache(maxsize=None)
def _probe_cuda(index: int) -> bool:
    if torch.cuda.get_device_capability(index) < (8, 0) or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return False
    device = torch.device("cuda", index)
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(64, 256, device=device, generator=gen)
    x = torch.randn(3, 256, device=device, generator=gen).to(torch.bfloat16)
    packed, sz = quantize_int4(w, 128)
    return kernel_agrees("int4", device, lambda: _matmul(x, _to_kernel(packed, "cuda", 8), sz, 128, "cuda"),
                         x.float() @ dequantize(packed, sz).t(), 0.02)


def _to_kernel(packed: torch.Tensor, kernel: str, tiles: int) -> torch.Tensor:
    if kernel == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(packed).to(torch.int32), tiles)
    return torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), tiles)


def _matmul(x2: torch.Tensor, weight: torch.Tensor, sz: torch.Tensor, group: int, kernel: str) -> torch.Tensor:
    if kernel == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group, sz)
    return torch.ops.aten._weight_int4pack_mm(x2, weight, group, sz)


def stored_linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bias=None) -> torch.Tensor:
    """x @ W.T (+ bias) for a weight in the stored form, for hosts that keep it in that form and
    page it (ComfyUI's layout, nodes/int4_layout.py): on a CUDA GPU with the kernel, repacked for
    it on every call (reads 0.5 byte per weight twice, instead of writing a bf16 copy); elsewhere
    dequantized."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    group = in_f // sz.shape[0]
    tiles = inner_k_tiles(in_f)
    if x.device.type == "cuda" and tiles is not None and out_f % 8 == 0 and kernel_for(x.device) == "cuda":
        shape = x.shape
        y = _matmul(x.reshape(-1, in_f).to(torch.bfloat16), _to_kernel(packed, "cuda", tiles), sz, group, "cuda")
        y = y.to(x.dtype).reshape(*shape[:-1], out_f)
    else:
        y = F.linear(x, dequantize(packed, sz, x.dtype))
    return y if bias is None else y + bias


def _from_kernel(weight: torch.Tensor, kernel: str, in_features: int, out_features: int, group: int) -> torch.Tensor:
    """The kernel's tiled layout back to the stored one: each column of the identity picks one
    input column, and scale 1 / zero 8 make the kernel return q itself (small integers are exact
    in bf16)."""
    ones = torch.ones(in_features // group, out_features, 2, dtype=torch.bfloat16, device=weight.device)
    ones[..., 1] = 8
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    step = 1024
    for c in range(0, in_features, step):
        n = min(step, in_features - c)
        eye = torch.zeros(n, in_features, dtype=torch.bfloat16, device=weight.device)
        eye[torch.arange(n), torch.arange(c, c + n)] = 1
        q = _matmul(eye, weight, ones, group, kernel).t().round().to(torch.uint8)  # [out, n]
        packed[:, c // 2:(c + n) // 2] = (q[:, 0::2] << 4) | q[:, 1::2]
    return packed


CPU_BLOCK = 64  # the CPU layout permutes nibbles within blocks of 64 output rows (a shorter last block alone)


@functools.lru_cache(maxsize=16)
def _cpu_source(rows: int, in_features: int, tiles: int) -> torch.Tensor:
    """For each nibble of a [rows, in] block in the CPU layout, the flat index (row * in + col) of
    the value it holds, found by packing the indices themselves four bits at a time."""
    index = torch.arange(rows * in_features, dtype=torch.int64).view(rows, in_features)
    source = torch.zeros(rows * in_features, dtype=torch.int64)
    for shift in range(0, max(4, (rows * in_features - 1).bit_length()), 4):
        digits = ((index >> shift) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits, tiles)
        source |= unpack(packed).reshape(-1).to(torch.int64) << shift
    return source


def _unpack_cpu(tiled: torch.Tensor, in_features: int, tiles: int) -> torch.Tensor:
    """The CPU layout back to the stored one by a cached permutation (no matmul: the identity
    trick would cost in x in x out multiply-adds per matrix on a CPU)."""
    rows_total = tiled.shape[0]
    q = torch.empty(rows_total, in_features, dtype=torch.uint8)
    nibbles = unpack(tiled)
    full = rows_total // CPU_BLOCK * CPU_BLOCK
    if full:
        blocks = q[:full].view(-1, CPU_BLOCK * in_features)
        blocks[:, _cpu_source(CPU_BLOCK, in_features, tiles)] = nibbles[:full].reshape(blocks.shape)
    if full < rows_total:
        q[full:].view(-1)[_cpu_source(rows_total - full, in_features, tiles)] = nibbles[full:].reshape(-1)
    return (q[:, 0::2] << 4) | q[:, 1::2]


class Int4Linear(nn.Module):
    """A Linear with group-wise int4 weights; the bias stays in the compute dtype. State-dict
    names are the Linear's plus `scale` (the [groups, out, 2] scale/zero pairs)."""

    fmt = "int4"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape[0], weight.shape[1] * 2
        self.group = self.in_features // scale.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)  # a parameter: whatever moves weights moves it too
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel: str | None = None  # the layout `weight` is in: None (stored form), 'cpu', 'cuda'
        self.kernel_device = None  # the device whose kernel that layout is for
        self.ready = False  # whether `weight` is in the layout its device computes with
        self._configure()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        w = linear.weight.detach()
        packed, sz = quantize_int4(w, group_size(w.shape[1]))
        return cls(packed, sz, None if linear.bias is None else linear.bias.detach())

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, device=None, dtype=None) -> "Int4Linear":
        g = group_size(in_features)
        return cls(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                   torch.empty(in_features // g, out_features, 2, dtype=torch.bfloat16, device=device),
                   torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def _configure(self) -> None:
        """Runs when the weight moves, never per call. On a GPU the weight is repacked for its
        kernel at once (cheap there); on the CPU only before its first use there, since a CPU
        is mostly where GPU weights are parked or streamed from, and unpacking the CPU layout
        again costs seconds per layer."""
        if self.weight.device.type == "meta":
            return
        if self.kernel is not None:  # this device's layout, or a GPU layout parked in RAM
            self.ready = self.kernel == self.weight.device.type
        elif self.weight.device.type == "cuda":
            self.prepare()
        else:
            self.ready = False

    def prepare(self) -> None:
        """Repack for the kernel of the weight's current device (if it has one), now."""
        device = self.weight.device
        tiles = inner_k_tiles(self.in_features)
        want = kernel_for(device) if tiles is not None and self.out_features % 8 == 0 else None
        if want != self.kernel:
            stored = self.stored_weight()
            new = _to_kernel(stored, want, tiles) if want is not None else stored
            self.weight = nn.Parameter(new, requires_grad=False)
            self.kernel, self.kernel_device = want, device
        self.ready = True

    def stored_weight(self) -> torch.Tensor:
        """The weight in the stored (device-independent) layout."""
        if self.kernel is None:
            return self.weight.data
        w = self.weight.data
        if self.kernel == "cpu":
            return _unpack_cpu(w.cpu(), self.in_features, inner_k_tiles(self.in_features)).to(w.device)
        home = self.scale.device if self.scale.device.type == self.kernel else self.kernel_device
        # a streamed layer's host copy keeps the layout of the device it runs on: unpack it there
        packed = _from_kernel(w.to(home), self.kernel, self.in_features, self.out_features, self.group)
        return packed.to(w.device)

    def _apply(self, fn, recurse=True):
        # Only the device changes (a dtype cast would destroy packed nibbles and bf16 scales). A
        # GPU layout parked in RAM stays as it is (it goes back unchanged, and streaming copies it
        # as it is); otherwise a tiled layout is unpacked before it leaves its kernel's device.
        target = fn(torch.empty(0, device=self.scale.device, dtype=torch.float32)).device
        parked = self.kernel == "cuda" and target.type == "cpu"
        if self.kernel is not None and target.type != self.kernel and not parked:
            self.weight = nn.Parameter(self.stored_weight(), requires_grad=False)
            self.kernel = None
        self.weight = nn.Parameter(self.weight.to(target), requires_grad=False)
        self.scale = nn.Parameter(self.scale.to(target), requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias), requires_grad=False)
        self._configure()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel is not None:
            destination[prefix + "weight"] = self.stored_weight()

    def _load_from_state_dict(self, *args, **kwargs):
        self.kernel = None  # what is loaded is the stored layout
        super()._load_from_state_dict(*args, **kwargs)
        self._configure()  # `load_state_dict(assign=True)` moves the weight without `_apply`

    def dequantized(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, dequantize(self.stored_weight(), self.scale, x.dtype))
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ready:
            self.prepare()
        if self.kernel is None:
            return self.dequantized(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = _matmul(x2, self.weight, self.scale, self.group, self.kernel).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, "
                f"kernel={self.kernel}, bias={self.bias is not None}")
