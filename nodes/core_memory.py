"""The three parts as ComfyUI's own models: built from core's layer classes, held by core's own
patcher, loaded by core's memory manager.

Core already pages, pins, prefetches, offloads and quantizes (dynamic VRAM on NVIDIA/AMD, partial
loads that cast per call elsewhere); a pack that brings its own patcher or pinned buffers makes a
load request "non-dynamic", which unloads the user's other models. So here the pack only tells
core what it has and what a run needs:
- `operations` / `quantized_linear`: the comfy.ops classes the loaders build the parts from (core's
  mixed-precision layers for int8/fp8, and for the pack's int4 registered as a core layout), so every
  decoder matrix is a layer core knows how to page;
- `manage`: `comfy.model_patcher.CoreModelPatcher` (ModelPatcherDynamic under dynamic VRAM) around
  a holder that names the paging units: one per decoder layer, the head whole, the VAE whole;
- `load_for_run`: one `load_models_gpu` request for the three parts with `memory_required` = the
  run's KV cache and activations (the engine's memory.run_bytes), then the backbone's layers run through core's
  prefetch queue, so the next layer's weights arrive while this one computes.
Nothing here moves a weight.
"""
from __future__ import annotations

import types

import torch

from . import bridge


def operations(dtype: torch.dtype, load_device: torch.device):
    """-> core's layer classes for a part kept and computed in `dtype`, or torch.nn outside ComfyUI."""
    ops = bridge.comfy_ops()
    if ops is None:
        return torch.nn
    return ops.pick_operations(dtype, dtype, load_device=load_device)


def quantized_linear(dtype: torch.dtype, load_device: torch.device, fmt: str):
    """-> core's Linear for decoder matrices in `fmt` (int8 -> int8_tensorwise, fp8 -> float8_e4m3fn,
    int4 -> the pack's layout registered with core), or None outside ComfyUI (the engine's own)."""
    ops = bridge.comfy_ops()
    if ops is None:
        return None
    mixed = ops.pick_operations(dtype, dtype, load_device=load_device,
                                model_config=types.SimpleNamespace(quant_config={"mixed_ops": True}))
    if fmt == "int4":
        from .int4_layout import with_int4
        mixed = with_int4(mixed)
    return mixed.Linear


class PartHolder(torch.nn.Module):
    """What the patcher holds. The patcher writes bookkeeping (`device`, `model_loaded_weight_memory`,
    `dynamic_pins`, ...) onto its module; the engine's parts keep `device` as their compute device,
    so they sit one level down."""

    def __init__(self, part: torch.nn.Module, offload_device: torch.device):
        super().__init__()
        self.part = part
        self.device = offload_device

    def get_dynamic_vram__units(self):
        """Paging units for dynamic VRAM: each decoder layer is fetched (and may be graphed by
        core) as one block; a part without layers is one block."""
        layers = getattr(self.part, "layers", None)
        return (list(layers), []) if layers is not None else ([self.part], [])


_HOLDERS: dict = {}


def _holder_class(part: torch.nn.Module) -> type:
    """A PartHolder named for the part: ComfyUI logs "Requested to load <class name>" at every load,
    and "NextStepBackbone" tells a user what is loading where "PartHolder" does not."""
    name = "NextStep" + type(part).__name__.replace("NextStep", "")
    if name not in _HOLDERS:
        _HOLDERS[name] = type(name, (PartHolder,), {"__doc__": PartHolder.__doc__})
    return _HOLDERS[name]


def manage(part: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
    """-> core's patcher for `part` (its class as core picked it at start-up), or None outside ComfyUI.
    The part computes on `load_device` wherever core keeps its weights."""
    cls = bridge.core_patcher_class()
    if cls is None:
        return None
    part.run_device = torch.device(load_device)
    return cls(_holder_class(part)(part, offload_device), load_device=load_device, offload_device=offload_device)


def refresh_size(patcher) -> None:
    """A part that grew (the LM head read for Self-CoT) must be sized again: core caches a model's size
    on its patcher the first time it asks."""
    if patcher is not None and hasattr(patcher, "size"):
        patcher.size = 0


def load_for_run(patchers: list, memory_required: int, backbone_patcher=None) -> None:
    """One request to core for the three parts (it makes room, keeping `memory_required` free, and
    loads or pages them as its mode says); then the backbone's layers are driven through core's
    prefetch queue and it is told whether its weights may move between calls."""
    patchers = [p for p in patchers if p is not None]
    mm = bridge.model_management()
    if mm is None or not patchers:
        return
    mm.load_models_gpu(patchers, memory_required=int(memory_required))
    if backbone_patcher is not None:
        bb = backbone_patcher.model.part
        bb.layer_runner = layer_runner(backbone_patcher)
        bb.paged = weights_may_move(backbone_patcher)


def weights_may_move(patcher) -> bool:
    """Dynamic VRAM pages weights in and out between calls, and a partial load casts some per call:
    either way nothing about the weights' addresses is fixed enough for the pack's whole-step CUDA
    graph (core graphs single layers itself, keyed on their pages)."""
    return bool(patcher.is_dynamic() or getattr(patcher.model, "model_lowvram", False))


def layer_runner(patcher):
    """-> a `Backbone.layer_runner` that drives the decoder layers through core's prefetch queue, or
    None (the plain loop) where core keeps no queue: without dynamic VRAM, or an older ComfyUI."""
    prefetch = bridge.comfy_prefetch()
    if prefetch is None or not patcher.is_dynamic():
        return None
    part = patcher.model.part

    def run(layers, body):
        device = part.run_device
        queue = prefetch.make_prefetch_queue(list(layers), device, {"prefetch_dynamic_vbars": True})
        for i, layer in enumerate(layers):
            prefetch.prefetch_queue_pop(queue, device, layer, part.dtype, core=lambda: body(i, layer))
        if queue is not None:
            prefetch.prefetch_queue_pop(queue, device, None)

    return run


def describe(patcher, n_layers: int) -> str:
    """What core did with the backbone, for the log and the node's status line."""
    kind = "dynamic VRAM (weights paged in per layer)" if patcher.is_dynamic() else (
        "partly loaded (the rest cast from RAM per call)" if getattr(patcher.model, "model_lowvram", False)
        else "loaded")
    return f"backbone {kind} on {patcher.load_device}; {n_layers} layers"
