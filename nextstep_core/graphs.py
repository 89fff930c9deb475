"""The whole per-token step as one replayable unit: flow head (all N steps, CFG, use_norm), the
feedback projection and the backbone step on every CFG row.

The step is written with static shapes and device-side positions (`Backbone.step_at`), so on
CUDA it is captured once per image as a CUDA graph and replayed per token: a 48-layer step then
costs the GPU's time, not Python's. Noise and CFG scales are copied into static buffers before
each replay (device-to-device, no host sync), which keeps a seed's image the same on every
device. On other devices, or when capture fails, the same step runs eagerly; `StaticStep.eager`
is what the CPU tests compare against the plain loop.
"""
from __future__ import annotations

import warnings

import torch


class StaticStep:
    def __init__(self, loop, hidden: torch.Tensor, cache, cfg_mult: int, n_draws_shape):
        self.loop, self.cache, self.cfg_mult = loop, cache, cfg_mult
        dev = hidden.device
        self.hidden = hidden.clone()
        self.noise = torch.zeros(n_draws_shape, dtype=torch.float32, device=dev)
        self.scale = torch.zeros(2, dtype=torch.float32, device=dev)
        self.pos = torch.tensor([cache.length], dtype=torch.long, device=dev)
        self.start = cache.length
        self.token = None
        self.graph = None

    def body(self) -> None:
        loop, bb = self.loop, self.loop.bb
        tok = loop.sample_token(self.hidden, self.noise, self.scale, self.cfg_mult)
        e = bb.image_in_projector(tok).repeat(self.cfg_mult, 1)
        h = bb.step_at(e[:, None], self.cache, self.pos, fast=not loop.s.exact)[:, -1]
        if self.token is None:
            self.token = tok.clone()
        else:
            self.token.copy_(tok)
        self.hidden.copy_(h)
        self.pos.add_(1)

    def capture(self) -> None:
        """Warm up on a side stream (as CUDA graph capture requires), then record one step. The
        warm-up writes cache slot `pos`, which the first replay simply writes again."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        saved = (self.hidden.clone(), self.pos.clone())
        with torch.cuda.stream(stream):
            self.body()
        torch.cuda.current_stream().wait_stream(stream)
        self.hidden.copy_(saved[0])
        self.pos.copy_(saved[1])
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
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
        cache.length = self.start + n_tokens - 1  # every token but the last went through the backbone


def graphed_loop(loop, hidden, cache, cfg_mult: int, n_tokens: int):
    """A StaticStep for this image, or None for the plain eager loop."""
    mode = loop.s.cuda_graphs
    if mode == "off" or n_tokens < 2:
        return None
    if getattr(loop.bb, "streamer", None) is not None:
        return None  # streamed layers swap weights in Python hooks: nothing fixed to capture
    if hidden.device.type != "cuda":
        if mode == "on":
            warnings.warn("cuda_graphs='on' needs a CUDA device; running eagerly.")
        return None
    from .samplers import draws_per_token
    shape = (draws_per_token(loop.s.sampler, loop.s.steps), hidden.shape[0] // cfg_mult, loop.bb.cfg.token_dim)
    loop.bb.rope(cache.max_len)  # built now: building it copies from the host, which capture cannot do
    step = StaticStep(loop, hidden, cache, cfg_mult, shape)
    try:
        step.capture()
    except Exception as exc:  # capture is an optimisation: never fail a generation over it
        if mode == "on":
            raise
        warnings.warn(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly.")
        torch.cuda.synchronize()
        return None
    return step
