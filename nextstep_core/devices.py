"""Device and dtype choice (bfloat16 on GPUs that have it, float16 where not, float32 on CPU), and
what a device has free for a new allocation."""
from __future__ import annotations

import torch

from .errors import DeviceError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
SLACK = 256 * 2 ** 20  # kept free beyond what is counted: allocator fragmentation, CUDA graphs, temporaries


def resolve_device(name: str | None = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was asked for but this PyTorch ({torch.__version__}) sees no CUDA GPU. "
                          "Use --device cpu, or install a CUDA build of PyTorch.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"device {name!r} was asked for but Apple MPS is not available here. Use --device cpu.")
    return dev


def cuda_bf16(device: torch.device, emulated: bool = False) -> bool:
    """Whether the GPU `device` (not the current one: it may be cuda:1) computes in bfloat16, in
    hardware (compute capability 8.0 and up), or at all when `emulated`. torch's own check counts
    emulation by default: a T4, V100 or RTX 20xx then says yes, and gets slow attention and
    dequantized int4 matmuls that no memory plan counts."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=emulated))
        except TypeError:  # torch before the argument existed: no emulation was counted then
            return bool(torch.cuda.is_bf16_supported())


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    name = (name or "auto").lower()
    device = torch.device(device)
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and not cuda_bf16(device):
            return torch.float16
        return torch.bfloat16
    if name not in DTYPES:
        raise DeviceError(f"Unknown dtype {name!r}; choose auto, bfloat16, float16 or float32.")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not cuda_bf16(device):
        if not cuda_bf16(device, emulated=True):
            raise DeviceError(f"{device} has no bfloat16 support: use float16 (or auto).")
        import warnings
        warnings.warn(f"{device} has no bfloat16 hardware: torch emulates it, which is much slower than float16 "
                      "(auto picks float16 there).")
    return dtype


def check_finite(t: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    """Raise, with what to choose instead, when `t` holds inf or NaN: a float16 run of a model trained
    in bfloat16 can overflow (its hidden states exceed 65504), and would otherwise draw a black
    image. One host read: call it where a sync happens anyway (after the prefill, at the image's end)."""
    if bool(torch.isfinite(t).all()):
        return
    if dtype is torch.float16:
        raise DeviceError(
            f"The model's values overflowed float16 ({where}): NextStep was trained in bfloat16 and its hidden "
            "states can exceed float16's range. Use a GPU with bfloat16 (Ampere or newer), or float32 (the "
            "loaders' dtype fp32, or --dtype float32; with int8 or int4 weights the decoder matrices stay 8- or "
            "4-bit, so float32 costs far less memory than it does for full-precision weights).")
    raise DeviceError(f"The model produced inf/NaN values ({where}) in {str(dtype).replace('torch.', '')}: the "
                      "weights may be damaged (download the model again) or the settings extreme.")


def kernel_agrees(label: str, device, fast, reference: torch.Tensor, bound: float) -> bool:
    """Run a fast kernel once on a small probe and compare it with the dequantized product:
    some builds ship a kernel that raises or is wrong on a given GPU, and the weights must then
    be dequantized instead. `fast` is called here so its failure is caught and reported."""
    import warnings
    try:
        out = fast().float()
    except (RuntimeError, NotImplementedError) as exc:
        warnings.warn(f"{label} matmul is not usable on {device} ({str(exc).splitlines()[0]}); {label} weights will "
                      "be dequantized per layer instead (slower).")
        return False
    err = float((out - reference).abs().mean() / reference.abs().mean())
    if not err < bound:
        warnings.warn(f"{label} matmul on {device} gave a relative error of {err:.3f} on a probe; {label} weights "
                      "will be dequantized per layer instead.")
        return False
    return True


def free_bytes(device) -> int | None:
    """What a new allocation on `device` can use (None where it is not known: CPU, MPS): the device's
    free memory plus what torch's allocator holds unused. `mem_get_info` alone misses the second
    part, which is often gigabytes after a model was offloaded.

    The same sum holds under `PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync` (ComfyUI's default):
    there `memory_reserved` and `memory_allocated` report the device's default memory pool (its
    reserved and its used bytes), and torch sets that pool's release threshold to the maximum, so
    freed blocks stay in the pool, invisible to `mem_get_info`, and serve torch's next allocations."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(0, int(cached))


class RunsOn:
    """Where a part computes, as a setting. By default that is where its weights are; a host that
    pages weights in per layer (ComfyUI's dynamic VRAM keeps them in RAM until a layer runs) sets
    `run_device`, and the engine puts its inputs, caches and RoPE tables there instead."""

    run_device = None

    @property
    def device(self) -> torch.device:
        return self.run_device if self.run_device is not None else self.weights_device()

    def weights_device(self) -> torch.device:
        raise NotImplementedError
