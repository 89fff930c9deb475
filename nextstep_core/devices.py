"""Device and dtype choice: bfloat16 on GPUs that have it, float16 where not, float32 on CPU."""
from __future__ import annotations

import torch

from .errors import DeviceError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if name not in DTYPES:
        raise DeviceError(f"Unknown dtype {name!r}; choose auto, bfloat16, float16 or float32.")
    dtype = DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError("This GPU has no bfloat16 support: use float16 (or auto).")
    return dtype


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
