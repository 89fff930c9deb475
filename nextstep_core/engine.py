"""The patchwise sampling loop: one prefill, then per image token the flow head's N steps and
exactly one backbone step for all CFG rows together.

Nothing in the loop reads a value back from the device: the schedule, CFG scales and noise are
prepared before it starts and indexed on the device, so a GPU never waits on Python. The only
hook is a callback after each token (progress, cancel, preview).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .backbone import Backbone
from .flow_head import FlowHead
from .kv_cache import StaticKVCache
from .noise import TokenNoise
from .samplers import cfg_values, combine_cfg, draws_per_token, sde_step, time_grid

LAST_STEP = 0.04  # the August-2025 head's final deterministic Euler step

TokenCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class SamplingSettings:
    cfg: float = 7.5
    cfg_img: float = 1.0
    cfg_schedule: str = "constant"
    steps: int = 28
    shift: float = 1.0
    use_norm: bool = False
    sampler: str = "nextstep1"
    exact: bool = False  # bit-parity with the reference (full-cache attention, per-step adaLN GEMMs)
    cuda_graphs: str = "auto"  # auto: capture the per-token step on CUDA, eager elsewhere; on; off
    compile: Optional[str] = None  # a torch.compile backend for the flow-head step ("inductor"); off by default


class TokenLoop:
    """Samples the image tokens of one prompt batch into a preallocated buffer."""

    def __init__(self, backbone: Backbone, head: FlowHead, settings: SamplingSettings):
        self.bb, self.head, self.s = backbone, head, settings
        if settings.compile:
            # optional and never required: the eager step is the reference, compiling only fuses it
            self.sample_token = torch.compile(self.sample_token, backend=settings.compile, dynamic=False)

    def _kv(self, cache: StaticKVCache, extra: int) -> Optional[int]:
        return None if self.s.exact else cache.length + extra

    def schedule(self, rows: int, n_tokens: int, device):
        """Everything the loop needs that does not depend on the tokens, made once per image."""
        s = self.s
        t = time_grid(s.sampler, s.steps, s.shift).to(device)
        self.t, self.t_eval = t, t[: s.steps]
        self.dts = t[1:] - t[:-1] if t.shape[0] > s.steps else None
        self.t_emb = self.head.time_embeddings(self.t_eval, rows)
        self.scales = cfg_values(s.cfg_schedule, s.cfg, s.cfg_img, n_tokens).to(torch.float32).to(device)

    def sample_token(self, hidden: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, cfg_mult: int) -> torch.Tensor:
        """One image token from the state before it: the head's N steps with CFG, then use_norm.
        hidden [rows, H]; z [draws, rows / cfg_mult, D] noise; scale [2] (cfg, cfg_img).
        Returns the token in the backbone dtype."""
        s, head, bb = self.s, self.head, self.bb
        c = bb.image_out_projector(hidden).to(head.dtype)
        mods = head.prepare(c, self.t_emb, per_step=s.exact)
        cfg_k, img_k = scale[0], scale[1]

        def v(x, i):
            out = head.velocity(x.repeat(cfg_mult, 1).to(head.dtype), mods, i).to(torch.float32)
            return combine_cfg(out, cfg_mult, cfg_k, img_k)

        t, t_eval, dts = self.t, self.t_eval, self.dts
        x = z[0]
        if s.sampler == "nextstep1":
            for i in range(s.steps - 1):
                x = sde_step(x, v(x, i), t_eval[i], t_eval[i + 1] - t_eval[i], z[i + 1])
            x = x + v(x, s.steps - 1) * LAST_STEP
        elif s.sampler == "nextstep1.1":
            for i in range(s.steps):
                x = sde_step(x, v(x, i), t[i], dts[i], z[i + 1])
        else:  # ode
            for i in range(s.steps):
                x = x + v(x, i) * dts[i]
        tok = x.to(bb.dtype)
        if s.use_norm:
            tok = F.layer_norm(tok, tok.shape[-1:], None, None, 1e-6)
        return tok

    def run(self, hidden: torch.Tensor, cache: StaticKVCache, cfg_mult: int, n_tokens: int, noise: TokenNoise,
            callback: Optional[TokenCallback] = None) -> torch.Tensor:
        """hidden: [rows, hidden] final-norm state at the last prompt position (boi).
        Returns [rows / cfg_mult, n_tokens, token_dim] in float32; the cache ends up holding every
        image token but the last (its backbone step would be wasted)."""
        from .graphs import graphed_loop
        bb = self.bb
        rows = hidden.shape[0]
        self.schedule(rows, n_tokens, hidden.device)
        tokens = torch.empty(rows // cfg_mult, n_tokens, bb.cfg.token_dim, dtype=torch.float32, device=hidden.device)
        fast = graphed_loop(self, hidden, cache, cfg_mult, n_tokens)
        for k in range(n_tokens):
            if fast is not None and k + 1 < n_tokens:
                tok, hidden = fast.replay(noise.for_token(k), self.scales[k])
                tokens[:, k] = tok.to(torch.float32)
            else:
                tok = self.sample_token(hidden, noise.for_token(k), self.scales[k], cfg_mult)
                tokens[:, k] = tok.to(torch.float32)
                if k + 1 < n_tokens:
                    e = bb.image_in_projector(tok).repeat(cfg_mult, 1)
                    hidden = bb.step(e[:, None], cache, self._kv(cache, 1))[:, -1]
            if callback is not None:
                callback(k + 1, n_tokens, tokens)
        if fast is not None:
            fast.finish(cache, n_tokens)
        return tokens

    def feed_last(self, tokens: torch.Tensor, cache: StaticKVCache, cfg_mult: int) -> torch.Tensor:
        """Run the step `run` skipped, for callers that continue the sequence (storyboards)."""
        e = self.bb.image_in_projector(tokens[:, -1].to(self.bb.dtype)).repeat(cfg_mult, 1)
        return self.bb.step(e[:, None], cache, self._kv(cache, 1))[:, -1]


def noise_for(settings: SamplingSettings, generator: torch.Generator, images_per_prompt: int, batch: int,
              token_dim: int, device, n_tokens: int) -> TokenNoise:
    return TokenNoise(generator, draws_per_token(settings.sampler, settings.steps), images_per_prompt, batch,
                      token_dim, device, n_tokens)
