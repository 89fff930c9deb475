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
from .limits import CFG, CFG_IMG, SHIFT, STEPS
from .noise import TokenNoise
from .samplers import FoldedSteps, cfg_values, check_schedule, combine_cfg, draws_per_token, get_sampler

TokenCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class SamplingSettings:
    """What the image is: the same settings and seed give the same tokens, however the run computes."""
    cfg: float = 7.5
    cfg_img: float = 1.0
    cfg_schedule: str = "constant"
    steps: int = 28
    shift: float = 1.0
    use_norm: bool = False
    sampler: str = "nextstep1"

    def __post_init__(self):
        """Checked once, where made, against the one table of ranges (limits.py): each error names
        the value and the fix. The sampler adds its own floor on steps."""
        for rule, value in ((CFG, self.cfg), (CFG_IMG, self.cfg_img), (SHIFT, self.shift), (STEPS, self.steps)):
            rule.check(value)
        check_schedule(self.cfg_schedule)
        get_sampler(self.sampler).check_steps(self.steps)


@dataclass(frozen=True)
class Execution:
    """How a run computes, which moves at most the last float bits of its tokens (`exact` makes them
    StepFun's bits on the CPU that made the goldens). A local run's choice: servers use their own."""
    exact: bool = False  # bit-parity with the reference (full-cache attention, per-step adaLN GEMMs)
    cuda_graphs: str = "auto"  # auto: capture the per-token step on CUDA, eager elsewhere; on; off
    compile: Optional[str] = None  # a torch.compile backend for the flow-head step ("inductor"); off by default


class TokenLoop:
    """Samples the image tokens of one prompt batch into a preallocated buffer."""

    def __init__(self, backbone: Backbone, head: FlowHead, settings: SamplingSettings,
                 execution: Execution = Execution()):
        self.bb, self.head, self.s, self.execution = backbone, head, settings, execution
        self.sampler = get_sampler(settings.sampler)
        if execution.compile:
            # optional and never required: the eager step is the reference, compiling only fuses it
            if not execution.exact:
                head.fused_modulation()  # the fused weight layout is made eagerly, before tracing
            self.sample_token = torch.compile(self.sample_token, backend=execution.compile, dynamic=False)

    def _kv(self, cache: StaticKVCache, extra: int) -> Optional[int]:
        return None if self.execution.exact else cache.length + extra

    def schedule(self, rows: int, n_tokens: int, device, cfg_mult: int):
        """Everything the loop needs that does not depend on the tokens, made once per image:
        the time grid, its embeddings, the CFG scales, and the sampler's per-step constants."""
        s, sampler = self.s, self.sampler
        t = sampler.time_grid(s.steps, s.shift).to(device)
        self.t_emb = self.head.time_embeddings(t[: s.steps], rows)
        self.scales = cfg_values(s.cfg_schedule, s.cfg, s.cfg_img, n_tokens).to(torch.float32).to(device)
        if self.execution.exact:  # the reference's scalars per step, made once with its own operations (same bits)
            self.constants, self.folded = sampler.constants(t, s.steps), None
        else:
            self.constants = None
            self.folded = FoldedSteps(sampler.coefficients(t, s.steps), cfg_mult, rows,
                                      sampler.draws_per_token(s.steps), device)

    def sample_token(self, hidden: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, cfg_mult: int) -> torch.Tensor:
        """One image token from the state before it: the head's N steps with CFG, then use_norm.
        hidden [rows, H]; z [draws, rows / cfg_mult, D] noise; scale [2] float32 (cfg, cfg_img).
        Returns the token in the backbone dtype.

        Exact: the sampler's own step (`Sampler.sample`, the reference's operations). Otherwise the
        same sampler folded (samplers/folded.py): the state is kept as the CFG rows the head reads,
        and per step x <- M_i v + A_i x + C_i w, M_i mixing the rows' velocities with B_i times their
        CFG weights (the SDE's var (1-t)^2 + t(1-t) is 1-t on paper), with the head's fast mode;
        rounding differs (measured and bounded in the tests)."""
        head, exact = self.head, self.execution.exact
        c = self.bb.image_out_projector(hidden)
        mods = head.prepare(c if c.dtype == head.dtype else c.to(head.dtype), self.t_emb, not exact)

        def velocities(xr, i):  # every CFG row's velocity at step i, float32, from the rows' x
            out = head.velocity(xr if xr.dtype == head.dtype else xr.to(head.dtype), mods[i], not exact)
            return out if out.dtype == torch.float32 else out.to(torch.float32)

        if exact:
            cfg_k, img_k = scale[0], scale[1]
            return self._finish(self.sampler.sample(
                lambda x, i: combine_cfg(velocities(x.repeat(cfg_mult, 1) if cfg_mult > 1 else x, i),
                                         cfg_mult, cfg_k, img_k), z, self.constants))
        fold = self.folded
        x, mix, noise = fold.start(z, scale)
        for i in range(self.s.steps):
            x = fold.step(i, x, velocities(x, i), mix, noise)
        return self._finish(fold.token(x))

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        tok = x if x.dtype == self.bb.dtype else x.to(self.bb.dtype)
        if self.s.use_norm:
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
        # a fresh [rows, hidden] tensor: the prefill's last position is a view whose strides carry the
        # prompt's length, which a compiled step would guard on (one compile per prompt length)
        hidden = hidden.clone(memory_format=torch.contiguous_format)
        self.schedule(rows, n_tokens, hidden.device, cfg_mult)
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
                    hidden = bb.step(e[:, None], cache, self._kv(cache, 1), fast=not self.execution.exact)[:, -1]
            if callback is not None:
                callback(k + 1, n_tokens, tokens)
        if fast is not None:
            fast.finish(cache, n_tokens)
        return tokens

    def feed_last(self, tokens: torch.Tensor, cache: StaticKVCache, cfg_mult: int) -> torch.Tensor:
        """Run the step `run` skipped, for callers that continue the sequence (storyboards)."""
        e = self.bb.image_in_projector(tokens[:, -1].to(self.bb.dtype)).repeat(cfg_mult, 1)
        return self.bb.step(e[:, None], cache, self._kv(cache, 1), fast=not self.execution.exact)[:, -1]


def noise_for(settings: SamplingSettings, generator: torch.Generator, images_per_prompt: int, batch: int,
              token_dim: int, device, n_tokens: int) -> TokenNoise:
    return TokenNoise(generator, draws_per_token(settings.sampler, settings.steps), images_per_prompt, batch,
                      token_dim, device, n_tokens)
