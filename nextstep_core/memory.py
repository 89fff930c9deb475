"""One model of what a run needs where: resident weights, streamed weights, KV cache,
activations and the VAE decode, from the config, the weight format, the image size, the batch,
the CFG rows, the context before the image and the memory that is free.

The CLI (`--gpu-layers auto`), the nodes (what a run needs beyond the weights, told to ComfyUI's
memory manager, which places the weights itself) and the README's memory table all ask this one
function, so what a user reads is what the code decides. From the CLI, layers that do not fit stay
in (pinned) CPU RAM and cross PCIe once per token (weights/streaming.py), so the only run refused
is one that does not fit even with every decoder layer streamed; the error gives the figures.

Weight bytes come from the modules themselves built on the meta device (no formula to drift
from the code); activations are the largest of the prefill of one layer and the VAE's
full-resolution feature maps, which never live at the same time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .devices import SLACK
from .errors import DeviceError
from .limits import token_grid

GiB = 2 ** 30
PCIE_GBPS = 25.0  # PCIe 4.0 x16 as measured by typical host-to-device copies; 5.0 cards roughly double it


@dataclass(frozen=True)
class MemoryPlan:
    layers: int
    resident: int                 # decoder layers kept on the device
    layer_bytes: int              # one decoder layer in the chosen format
    fixed_weight_bytes: int       # embeddings, norms, projectors (+ LM head) and the other parts' weights
    kv_bytes: int
    activation_bytes: int         # the larger of prefill activations and the VAE decode
    buffer_bytes: int             # the two prefetch sets of streamed layers (0 when nothing streams)
    free_bytes: Optional[int]     # what the device had free (None: not known, e.g. CPU)
    capture_bytes: int = 0        # the kept CUDA graph step's own KV cache (graphs.py); 0 when none is made

    @property
    def streamed(self) -> int:
        return self.layers - self.resident

    @property
    def streamed_bytes(self) -> int:
        """Bytes crossing PCIe per image token."""
        return self.streamed * self.layer_bytes

    @property
    def device_bytes(self) -> int:
        return (self.fixed_weight_bytes + self.resident * self.layer_bytes + self.kv_bytes + self.activation_bytes
                + self.buffer_bytes + self.capture_bytes + SLACK)

    @property
    def host_bytes(self) -> int:
        return self.streamed_bytes

    def seconds_per_token(self, pcie_gbps: float = PCIE_GBPS) -> float:
        """The time streaming adds per token, when the copies are not hidden behind compute."""
        return self.streamed_bytes / (pcie_gbps * 1e9)

    def describe(self, tokens: int = 1024) -> str:
        where = f"{self.resident}/{self.layers} layers on the GPU"
        if not self.streamed:
            return f"{where}, nothing streamed; {self.device_bytes / GiB:.1f} GiB on the device"
        per = self.seconds_per_token()
        return (f"{where}, {self.streamed_bytes / GiB:.2f} GiB streamed from CPU RAM per token (about "
                f"{per * 1000:.0f} ms per token over PCIe, {per * tokens:.0f} s more for a {tokens}-token image); "
                f"{self.device_bytes / GiB:.1f} GiB on the device, {self.host_bytes / GiB:.1f} GiB pinned in RAM")


def bytes_on(module: torch.nn.Module, device) -> int:
    """Bytes of `module`'s parameters and buffers that sit on `device` now: memory a new placement of
    the same module may count as its own (they are freed when it moves)."""
    device = torch.device(device)
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        same = t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))
        key = t.untyped_storage().data_ptr() or id(t)  # views of one buffer (fused layouts) count once
        if same and key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


def weight_bytes(cfg, fmt: Optional[str], dtype_bytes: int, lm_head: bool = False) -> tuple[int, int]:
    """-> (bytes of one decoder layer, bytes of everything else in the backbone) in `fmt`
    (None: full precision at `dtype_bytes` per value), from the modules built on meta."""
    from .backbone import Backbone
    from .weights.quant import empty_quantized_layers, quantized_names
    with torch.device("meta"):
        bb = Backbone(dataclasses.replace(cfg, num_layers=1), with_lm_head=lm_head)
        if fmt is not None:
            empty_quantized_layers(bb, fmt)
    own = quantized_names(bb)
    layer = rest = 0
    for name, t in bb.state_dict().items():
        size = t.numel() * (t.element_size() if name in own else dtype_bytes)
        if name.startswith("layers."):
            layer += size
        else:
            rest += size
    return layer, rest


def kv_bytes(cfg, rows: int, positions: int, dtype_bytes: int) -> int:
    return 2 * cfg.num_layers * rows * cfg.num_kv_heads * cfg.head_dim * positions * dtype_bytes


def run_bytes(backbone, vae, shape) -> int:
    """Device memory a run of this shape (pipeline.RunShape) takes beside the weights: KV cache,
    activations and a margin. What a host that places the weights itself (ComfyUI) keeps free."""
    p = plan(backbone.cfg, None, backbone.dtype.itemsize, width=shape.width, height=shape.height,
             batch=shape.batch, cfg_rows=shape.cfg_rows, context_tokens=shape.context, vae_channels=vae.cfg.ch,
             patch=backbone.cfg.latent_patch_size * vae.cfg.down_factor)
    return p.kv_bytes + p.activation_bytes + SLACK


def plan(cfg, fmt: Optional[str], dtype_bytes: int, *, width: int, height: int, batch: int = 1, cfg_rows: int = 2,
         context_tokens: int = 512, free_bytes: Optional[int] = None, other_weight_bytes: int = 0,
         vae_channels: int = 128, lm_head: bool = False, gpu_layers: Optional[int] = None,
         patch: int = 16, graphs: bool = False) -> MemoryPlan:
    """What runs where. `cfg_rows`: rows per image (1 without CFG, 2 with text CFG, 3 for edits
    with image CFG); `context_tokens`: positions before the image tokens (prompt, edit image,
    story so far, reasoning); `other_weight_bytes`: the flow head and the VAE (always resident);
    `gpu_layers`: a fixed number of resident layers instead of as many as fit; `graphs`: the run
    captures its step as a CUDA graph when the whole backbone is resident, which keeps a second KV
    cache (when only that does not fit, the plan still keeps the backbone whole and the image runs
    eagerly, far cheaper than streaming layers).

    Raises DeviceError, with the figures, only when even zero resident layers do not fit."""
    n = cfg.num_layers
    layer, rest = weight_bytes(cfg, fmt, dtype_bytes, lm_head)
    rows = batch * cfg_rows
    grid = token_grid(width, height, patch)
    tokens = grid[0] * grid[1]
    kv = kv_bytes(cfg, rows, context_tokens + tokens, dtype_bytes)
    prefill = rows * context_tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * dtype_bytes
    decode = 4 * width * height * vae_channels * dtype_bytes * batch
    act = max(prefill, decode)
    fixed = rest + other_weight_bytes
    base = dict(layers=n, layer_bytes=layer, fixed_weight_bytes=fixed, kv_bytes=kv, activation_bytes=act,
                free_bytes=free_bytes)
    if gpu_layers is not None:
        if not 0 <= gpu_layers <= n:
            from .errors import SettingsError
            raise SettingsError(f"gpu_layers={gpu_layers}: use 0..{n} ({n} keeps the whole backbone on the GPU), "
                                "or auto.")
        return MemoryPlan(resident=gpu_layers, buffer_bytes=2 * layer if gpu_layers < n else 0,
                          capture_bytes=kv if graphs and gpu_layers == n else 0, **base)
    whole = MemoryPlan(resident=n, buffer_bytes=0, capture_bytes=kv if graphs else 0, **base)
    if free_bytes is None or whole.device_bytes <= free_bytes:
        return whole
    eager = dataclasses.replace(whole, capture_bytes=0)
    if eager.device_bytes <= free_bytes:
        return eager
    none = MemoryPlan(resident=0, buffer_bytes=2 * layer, **base)
    if none.device_bytes > free_bytes:
        raise DeviceError(
            f"This run needs {none.device_bytes / GiB:.2f} GiB on the GPU even with every decoder layer streamed "
            f"from RAM ({fixed / GiB:.2f} GiB of other weights, {kv / GiB:.2f} GiB KV cache for {rows} rows x "
            f"{context_tokens + tokens} positions, {act / GiB:.2f} GiB activations, {2 * layer / GiB:.2f} GiB "
            f"prefetch buffers, {SLACK / GiB:.2f} GiB margin), but only {free_bytes / GiB:.2f} GiB is free. Make "
            f"the image smaller, the batch smaller, or turn CFG off; or free the GPU of other models.")
    resident = min(n - 1, (free_bytes - none.device_bytes) // layer)
    return MemoryPlan(resident=int(resident), buffer_bytes=2 * layer, **base)
