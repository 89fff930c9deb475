"""Where the parts go for one run: the flow head and VAE whole on the GPU, the backbone whole
when it fits, otherwise as many decoder layers as fit with the rest streamed from RAM per token.

Streaming is the engine's own (nextstep_core/weights/streaming.py), driven from here, rather than ComfyUI's
lowvram partial loads: those stream only modules built from `comfy.ops` layers, cast weights per
call in full precision, and know nothing of our int8/fp8/int4 linears or of the per-token
prefetch the decode loop needs. ComfyUI still decides how much room there is: other models are
offloaded first (free_memory), and what it reports free minus its reserve (--reserve-vram) is
what memory.plan divides. With --novram nothing stays: every layer streams.

The layers a streamed run put on the GPU go back to RAM after it, since ComfyUI did not place
them and cannot count them; a whole backbone stays loaded under ComfyUI's management as before.
"""
from __future__ import annotations

import contextlib

from . import bridge
from ..nextstep_core.memory import plan
from ..nextstep_core.weights.streaming import stream_layers
from ..nextstep_core.weights.quant import format_of


def part_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def backbone_plan(backbone, vae, rows: int, batch: int, tokens: int, context: int, free_bytes, gpu_layers=None):
    bb = backbone.module
    side = round(tokens ** 0.5)  # the model only needs positions and pixels: a square of the same count
    patch = bb.cfg.latent_patch_size * vae.module.cfg.down_factor
    return plan(bb.cfg, format_of(bb), bb.dtype.itemsize, width=side * patch, height=(tokens // side) * patch,
                batch=batch, cfg_rows=max(1, rows // batch), context_tokens=context, free_bytes=free_bytes, vae_channels=vae.module.cfg.ch,
                lm_head=bb.lm_head is not None, gpu_layers=gpu_layers, patch=patch)


@contextlib.contextmanager
def placed(backbone, flow_head, vae, rows: int, batch: int, tokens: int, context: int, memory_required: int,
           node_id=None):
    """`rows`: all CFG rows of the `batch` images; `tokens`: image tokens per image; `context`: positions
    before them (prompt, edit image, reasoning, story)."""
    device = backbone.load_device
    if not bridge.streams_weights(device):
        moved = bridge.load_to_device([backbone.patcher, flow_head.patcher, vae.patcher], memory_required)
        try:
            yield None
        finally:
            bridge.park(moved)
        return
    moved = bridge.load_to_device([flow_head.patcher, vae.patcher], memory_required)
    streamer = None
    try:
        whole = backbone_plan(backbone, vae, rows, batch, tokens, context, None)
        novram = bridge.vram_mode() == "no_vram"
        free = bridge.make_room(whole.device_bytes, device, keep=[flow_head.patcher, vae.patcher])
        already = bridge.is_loaded(backbone.patcher)  # whole, from an earlier run, and still there
        chosen = backbone_plan(backbone, vae, rows, batch, tokens, context, None if already else free,
                               gpu_layers=0 if novram else None)
        if chosen.streamed == 0:
            bridge.load_to_device([backbone.patcher], memory_required)
        else:
            streamer = stream_layers(backbone.module, chosen.resident, device, chosen)
        bridge.show(chosen.describe(tokens), node_id)
        yield chosen
    finally:
        if streamer is not None:
            streamer.remove()
            backbone.module.to(backbone.patcher.offload_device)
        bridge.park(moved)
