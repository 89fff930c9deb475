"""Where the parts go for a run: the flow head and VAE whole on the GPU, the backbone whole when it
fits, otherwise as many decoder layers as fit with the rest streamed from RAM per token.

Streaming is the engine's own (nextstep_core/weights/streaming.py) rather than ComfyUI's lowvram
partial loads: those stream only modules built from `comfy.ops` layers, cast weights per call in
full precision, and know nothing of our int8/fp8/int4 linears or of the per-token prefetch the
decode loop needs. ComfyUI still decides: the three parts are loaded in one `load_models_gpu`
request (other models are offloaded first, --novram gives the backbone no room, --reserve-vram is
kept free), through a patcher whose loads and unloads are ours (patcher.py). The backbone's placer
sizes the resident layers with memory.plan from what ComfyUI reports free and caps them by the
room ComfyUI grants. What is placed stays until ComfyUI asks for the memory back, so the next run
or storyboard panel starts without moving a byte.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from . import bridge
from .patcher import WholePlacer, on
from ..nextstep_core.memory import MemoryPlan, SLACK, plan, within
from ..nextstep_core.weights.quant import format_of
from ..nextstep_core.weights.streaming import stream_layers


@dataclass(frozen=True)
class RunShape:
    """What the next run needs beside weights: CFG rows of the `batch` images, image tokens per image,
    positions before them (prompt, edit image, reasoning, story) and the VAE that decodes it."""
    rows: int
    batch: int
    tokens: int
    context: int
    vae: torch.nn.Module


def backbone_plan(bb, shape: RunShape, free_bytes, gpu_layers=None) -> MemoryPlan:
    side = round(shape.tokens ** 0.5)  # the model only needs positions and pixels: a square of the same count
    patch = bb.cfg.latent_patch_size * shape.vae.cfg.down_factor
    return plan(bb.cfg, format_of(bb), bb.dtype.itemsize, width=side * patch,
                height=(shape.tokens // side) * patch, batch=shape.batch, cfg_rows=max(1, shape.rows // shape.batch),
                context_tokens=shape.context, free_bytes=free_bytes, vae_channels=shape.vae.cfg.ch,
                lm_head=bb.lm_head is not None, gpu_layers=gpu_layers, patch=patch)


def run_bytes(p: MemoryPlan) -> int:
    """Device memory a run takes beside what stays placed: ComfyUI's `memory_required`."""
    return p.kv_bytes + p.activation_bytes + SLACK


class BackbonePlacer(WholePlacer):
    """The backbone whole on its device, or its first `resident` layers there and the rest streamed."""

    def __init__(self, part, load_device, offload_device):
        super().__init__(part, load_device, offload_device)
        self.shape: Optional[RunShape] = None   # set before each run's load request
        self.plan: Optional[MemoryPlan] = None  # what is placed now (None: nothing, or not on a GPU)

    def bytes_on_device(self) -> int:
        if self.plan is not None:
            return self.plan.weight_device_bytes
        return 0 if bridge.streams_weights(self.load_device) else super().bytes_on_device()

    def load(self, device: torch.device, budget: float) -> int:
        if not bridge.streams_weights(device):
            return super().load(device, budget)
        if self.shape is None:  # ComfyUI offering room outside a run of ours: nothing to size it by
            return 0
        here = self.bytes_on_device()
        need = run_bytes(backbone_plan(self.part, self.shape, None))
        fits = backbone_plan(self.part, self.shape, bridge.room(device, need) + here)  # DeviceError if nothing fits
        chosen = within(fits, here + budget)
        if self.plan is None or chosen.resident != self.plan.resident:
            self.unload()
            if chosen.streamed:
                stream_layers(self.part, chosen.resident, device, chosen)
            else:
                self.part.to(device)
        else:  # same layers as last run; parts read since (the LM head for Self-CoT) still have to go there
            for name, child in self.part.named_children():
                if name != "layers" and not on(child, device):
                    child.to(device)
            if self.part.streamer is not None:
                self.part.streamer.reset()  # the last run may have stopped inside the layers
        self.plan = chosen
        return chosen.weight_device_bytes - here

    def unload(self) -> int:
        freed = self.bytes_on_device()
        if self.part.streamer is not None:
            self.part.streamer.remove()
        self.part.to(self.offload_device)
        self.plan = None
        return freed


@contextlib.contextmanager
def placed(backbone, flow_head, vae, rows: int, batch: int, tokens: int, context: int, node_id=None):
    """Asks ComfyUI for the three parts on their device for one run; yields the backbone's plan
    (None where nothing streams: CPU, Apple GPUs, outside ComfyUI). Nothing is moved back after it."""
    shape = RunShape(rows, batch, tokens, context, vae.module)
    placer = getattr(getattr(backbone.patcher, "model", None), "placer", None)
    if placer is not None:
        placer.shape = shape
    try:
        bridge.load_to_device([backbone.patcher, flow_head.patcher, vae.patcher],
                              run_bytes(backbone_plan(backbone.module, shape, None)))
    finally:
        if placer is not None:
            placer.shape = None
    chosen = getattr(placer, "plan", None)
    if chosen is not None:
        bridge.show(chosen.describe(tokens), node_id)
    elif bridge.in_comfyui():
        n = len(backbone.module.layers)
        bridge.show(f"{n}/{n} layers on {backbone.load_device}, nothing streamed (streaming is for CUDA GPUs)",
                    node_id)
    yield chosen
