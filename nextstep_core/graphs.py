"""The whole per-token step as one replayable unit: flow head (all N steps, CFG, use_norm), the
feedback projection and the backbone step on every CFG row.

The step is written with static shapes and device-side positions (`Backbone.step_at`), so on
CUDA it is captured as a CUDA graph and replayed per token: a 48-layer step then costs the GPU's
time, not Python's. A capture (warm-up, ~3,000 kernels recorded, instantiation, and a device
synchronisation that empties the caching allocator) is kept on the backbone for the next image
with the same shapes and settings: it owns its KV cache, the prompt's slots are copied in before
the first token and the image's slots copied back after the last. Noise and CFG scales are copied into static buffers before
each replay (device-to-device, no host sync), which keeps a seed's image the same on every
device. On other devices, or when capture fails, the same step runs eagerly; `StaticStep.eager`
is what the CPU tests compare against the plain loop.

The capture's own KV cache is a second cache beside the run's: memory.plan counts it, it is made
only when the device has room for it, and failing to make it (or to capture) runs the image
eagerly instead of failing it. A kept capture is dropped as soon as either part moves
(`release_if_moved`, called from their `_apply`), so an offload frees its memory at once.

Every CUDA call here runs under `torch.cuda.device(dev)`: streams, synchronisation and the capture
use the current device unless told, and the run's device may be cuda:1. Capture is in
"thread_local" mode, so CUDA calls that other threads of the host process make meanwhile do not
invalidate it. Under ComfyUI's `backend:cudaMallocAsync` allocator nothing else changes: no
private pool is passed (that backend has none), and a capture it refuses (it allows one at a time
per process) falls back to eager like any other failed capture. What only a GPU can show: there
the step's temporaries become the driver's graph memory rather than the pool's, so how much of a
released capture's memory `mem_get_info` sees freed at once is measured by the device check.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


class StaticStep:
    def __init__(self, loop, hidden: torch.Tensor, cache, cfg_mult: int, n_draws_shape, own_cache: bool = False):
        self.loop, self.cfg_mult = loop, cfg_mult
        dev = self.device = hidden.device
        self.hidden = hidden.clone()
        self.noise = torch.zeros(n_draws_shape, dtype=torch.float32, device=dev)
        self.scale = torch.zeros(2, dtype=torch.float32, device=dev)
        self.pos = torch.tensor([cache.length], dtype=torch.long, device=dev)
        self.start = cache.length
        self.cache = loop.bb.new_cache(cache.batch, cache.max_len) if own_cache else cache
        if own_cache:
            self.begin(hidden, cache)
        self.token = None
        self.graph = None

    def begin(self, hidden: torch.Tensor, cache) -> None:
        """Start an image from `cache` (prefilled up to cache.length) and its last hidden state:
        copies the filled slots into this step's own cache (device to device, no sync)."""
        n = cache.length
        for mine, theirs in zip(self.cache.keys + self.cache.values, cache.keys + cache.values):
            mine[:, :, :n].copy_(theirs[:, :, :n])
        self.cache.valid.copy_(cache.valid)
        self.hidden.copy_(hidden)
        self.pos.fill_(n)
        self.start = n

    def body(self) -> None:
        loop, bb = self.loop, self.loop.bb
        tok = loop.sample_token(self.hidden, self.noise, self.scale, self.cfg_mult)
        e = bb.image_in_projector(tok).repeat(self.cfg_mult, 1)
        h = bb.step_at(e[:, None], self.cache, self.pos, fast=not loop.execution.exact)[:, -1]
        if self.token is None:
            self.token = tok.clone()
        else:
            self.token.copy_(tok)
        self.hidden.copy_(h)
        self.pos.add_(1)

    def capture(self) -> None:
        """Warm up on a side stream (as CUDA graph capture requires), then record one step on that
        stream (torch's default capture stream is made once, on whichever device was current
        then). The warm-up writes cache slot `pos`, which the first replay simply writes again."""
        dev = self.device
        with torch.cuda.device(dev):
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            saved = (self.hidden.clone(), self.pos.clone())
            with torch.cuda.stream(stream):
                self.body()
            torch.cuda.current_stream(dev).wait_stream(stream)
            self.hidden.copy_(saved[0])
            self.pos.copy_(saved[1])
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                self.body()
            self.hidden.copy_(saved[0])
            self.pos.copy_(saved[1])

    def replay(self, noise: torch.Tensor, scale: torch.Tensor):
        self.noise.copy_(noise)
        self.scale.copy_(scale)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()
        return self.token, self.hidden

    def finish(self, cache, n_tokens: int) -> None:
        end = self.start + n_tokens - 1  # every token but the last went through the backbone
        if self.cache is not cache:  # the caller may continue the sequence (storyboards): hand the slots back
            for mine, theirs in zip(self.cache.keys + self.cache.values, cache.keys + cache.values):
                theirs[:, :, self.start:end].copy_(mine[:, :, self.start:end])
            cache.valid[:, self.start:end].copy_(self.cache.valid[:, self.start:end])
        cache.length = end


def capturable(device: torch.device) -> bool:
    return device.type == "cuda"


def _fingerprint(loop) -> tuple:
    """Where every weight and table the captured step reads lives: a model moved or offloaded
    since the capture (ComfyUI does that) must never replay a graph that reads freed memory."""
    bb, head = loop.bb, loop.head
    tensors = [*bb.parameters(), *bb.buffers(), *head.parameters(), *head.buffers()]
    rope = bb._rope
    if rope is not None:
        tensors += [rope.cos, rope.sin, rope.sin_signed]
    return tuple(t.data_ptr() for t in tensors)


def _key(loop, hidden, cache, cfg_mult: int) -> tuple:
    s, x = loop.s, loop.execution
    return (tuple(hidden.shape), hidden.dtype, str(hidden.device), cache.max_len, cfg_mult, s.sampler, s.steps,
            s.shift, s.use_norm, x.exact, x.compile)


@dataclass
class _Kept:
    key: tuple
    fingerprint: tuple
    step: StaticStep


def release(part) -> None:
    """Drop the kept capture that `part` (the backbone or the flow head) takes part in, with its KV
    cache, static buffers and graph, from both parts."""
    kept = part.__dict__.pop("_kept_step", None)
    if kept is None:
        return
    for other in (kept.step.loop.bb, kept.step.loop.head):
        if other.__dict__.get("_kept_step") is kept:
            del other.__dict__["_kept_step"]


def release_if_moved(part) -> None:
    """After `part` was moved or cast: a capture whose weights no longer sit where it recorded them
    can never replay, so its memory goes now rather than at the next run (a memory manager
    offloading the part counts that memory as freed). A move to where the part already is keeps it."""
    kept = part.__dict__.get("_kept_step")
    if kept is not None and kept.fingerprint != _fingerprint(kept.step.loop):
        release(part)


def _room_for(step_cache_bytes: int, device: torch.device) -> bool:
    from .devices import SLACK, free_bytes
    free = free_bytes(device)
    return free is None or step_cache_bytes + SLACK <= free


def graphed_loop(loop, hidden, cache, cfg_mult: int, n_tokens: int):
    """A StaticStep for this image (the kept one when shapes, settings and weights match), or None
    for the plain eager loop."""
    mode = loop.execution.cuda_graphs
    if mode == "off" or n_tokens < 2:
        return None
    if getattr(loop.bb, "streamer", None) is not None or getattr(loop.bb, "paged", False):
        release(loop.bb)  # a capture over weights that now move can never replay: its memory goes now
        return None  # weights streamed, or paged by a host, between calls: nothing fixed to capture
    if not capturable(hidden.device):
        if mode == "on":
            warnings.warn("cuda_graphs='on' needs a CUDA device; running eagerly.")
        return None
    bb, head = loop.bb, loop.head
    key = _key(loop, hidden, cache, cfg_mult)
    kept = bb.__dict__.get("_kept_step")
    if kept is not None and kept.key == key and kept.fingerprint == _fingerprint(loop) and \
            head.__dict__.get("_kept_step") is kept:
        kept.step.begin(hidden, cache)
        return kept.step
    release(bb)  # its memory goes before a new capture takes more
    release(head)
    from .samplers import draws_per_token
    shape = (draws_per_token(loop.s.sampler, loop.s.steps), hidden.shape[0] // cfg_mult, bb.cfg.token_dim)
    need = bb.cache_bytes(cache.batch, cache.max_len)
    if mode == "auto" and not _room_for(need, hidden.device):
        warnings.warn(f"No room on {hidden.device} for the CUDA graph's own KV cache ({need / 2**30:.2f} GiB); "
                      "running eagerly (slower per token).")
        return None
    step = None
    try:
        bb.rope(cache.max_len)  # built now: building it copies from the host, which capture cannot do
        step = StaticStep(loop, hidden, cache, cfg_mult, shape, own_cache=True)
        step.capture()
    except Exception as exc:  # capture is an optimisation: never fail a generation over it
        if mode == "on":
            raise
        del step  # the capture's KV cache and buffers go before the eager run needs the memory
        where = ""
        if hidden.device.type == "cuda":
            where = f" on {hidden.device}, allocator {torch.cuda.memory.get_allocator_backend()}"
        warnings.warn(f"CUDA graph capture failed{where} ({type(exc).__name__}: {exc}); running eagerly.")
        if hidden.device.type == "cuda":
            torch.cuda.synchronize(hidden.device)
        return None
    kept = _Kept(key, _fingerprint(loop), step)  # after the warm-up laid out fused weights
    bb.__dict__["_kept_step"] = kept
    head.__dict__["_kept_step"] = kept
    return step
