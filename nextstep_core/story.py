"""Storyboards: panels that share one sequence, as NextStep saw interleaved stories in training.

Panel k continues the sequence of panels 1..k-1 (their text and image tokens, already in the KV
cache): `<|end_of_image|>` closes each image, then the next caption, `<|image_area|>h*w`, boi and
the new image tokens. CFG rows: the conditional row carries the story and the new caption; the
unconditional row carries the same story but the negative prompt in place of the new caption, so
guidance strengthens the new caption while both branches stay consistent with earlier panels
(the same choice as the edit model's image+negative row). The first panel is therefore exactly a
plain text-to-image run. A context is never modified: adding a panel copies the cache into a new,
larger one, so two different panel 3s grown from one panel 2 cannot disturb each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from . import backbone as backbone_module
from .devices import check_finite
from .engine import Execution, SamplingSettings, TokenCallback, TokenLoop, noise_for
from .errors import SettingsError
from .images import from_hwc_float
from .limits import check_size
from .kv_cache import StaticKVCache
from .noise import make_generator
from .pipeline import NextStepPipeline, Request
from .prompts import cfg_mult_for, image_prefix, left_pad


@dataclass
class Segment:
    ids: torch.Tensor          # [rows, L] text ids of this panel (left padded per panel), then the image prefix
    mask: torch.Tensor         # [rows, L]
    tokens: torch.Tensor       # [n, token_dim] the panel's image tokens (float32, CPU)
    grid: tuple


@dataclass
class StoryContext:
    """Everything needed to continue a story: the cache holds the whole sequence so far, eoi included."""
    cfg_mult: int
    negative: str
    style: str
    cache: Optional[StaticKVCache] = None
    segments: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def offloaded(self) -> "StoryContext":
        """The same story with its cache in CPU RAM (the next panel copies it back)."""
        if self.cache is None or self.cache.valid.device.type == "cpu":
            return self
        return StoryContext(self.cfg_mult, self.negative, self.style, self.cache.offloaded(), self.segments)


def styled(style: str, prompt: str) -> str:
    """A panel's caption: the story's character and style text, then the panel's prompt."""
    return f"{style} {prompt}".strip() if style else prompt


def edit_chain_request(ctx: StoryContext, prompt: str, *, seed: int, sampling: SamplingSettings, positive: str,
                       width: int, height: int, previous=None) -> Request:
    """The other story mode: each panel an edit of the one before (`previous`, a [1, H, W, 3]
    image; the edit model), the first drawn from text without image guidance. The request runs
    as any other, so its memory is planned the same way."""
    text = styled(ctx.style, prompt)
    if previous is None:
        return Request([text], width, height, positive=positive, negative=ctx.negative, seed=int(seed),
                       sampling=replace(sampling, cfg_img=1.0))
    return Request([text], None, None, positive=positive, negative=ctx.negative, seed=int(seed), sampling=sampling,
                   edit_images=[from_hwc_float(previous[0])], fit="none")


@dataclass
class Panel:
    image: torch.Tensor        # [1, H, W, 3]
    tokens: torch.Tensor       # [1, n, token_dim]
    context: StoryContext      # the story including this panel


class Storyboard:
    def __init__(self, pipeline: NextStepPipeline):
        self.pipe = pipeline

    @staticmethod
    def start(*, cfg: float, negative: str = "", style: str = "") -> StoryContext:
        return StoryContext(cfg_mult=cfg_mult_for(cfg, 1.0, editing=False), negative=negative or "", style=style or "")

    def _panel_ids(self, ctx: StoryContext, prompt: str, positive: str, grid) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.pipe.tokenizer
        text = styled(ctx.style, prompt)
        if positive:
            text = f"{text} {positive}"
        texts = [text] + ([ctx.negative] if ctx.cfg_mult == 2 else [])
        lead = [tok.eoi_id] if ctx.segments else []  # close the previous image
        return left_pad(tok, [lead + tok.encode(t) for t in texts], image_prefix(tok, grid))

    def needed_length(self, ctx: StoryContext, prompt: str, width: int, height: int, positive: str = "") -> int:
        grid = self.grid(width, height)
        ids, _ = self._panel_ids(ctx, prompt, positive, grid)
        return ctx.length + ids.shape[1] + grid[0] * grid[1]

    def grid(self, width, height):
        check_size(width, height)
        return self.pipe.grid(width, height)

    @torch.inference_mode()
    def add_panel(self, ctx: StoryContext, prompt: str, *, width: int, height: int, seed: int,
                  sampling: SamplingSettings, positive: str = "", callback: Optional[TokenCallback] = None,
                  execution: Execution = Execution()) -> Panel:
        if not isinstance(prompt, str) or not prompt.strip():
            raise SettingsError(f"Panel {len(ctx.segments) + 1} has an empty prompt: write what it shows.")
        if (sampling.cfg != 1.0) != (ctx.cfg_mult == 2):
            raise SettingsError("A story keeps one CFG layout: use cfg 1 for all panels or cfg > 1 for all panels.")
        bb, dev = self.pipe.backbone, self.pipe.device
        grid = self.grid(width, height)
        ids, mask = self._panel_ids(ctx, prompt, positive, grid)
        n = grid[0] * grid[1]
        need = ctx.length + ids.shape[1] + n
        limit = bb.cfg.max_position_embeddings
        if need > limit:
            raise SettingsError(
                f"Panel {len(ctx.segments) + 1} would make the story {need} tokens long; the model's limit is "
                f"{limit}. Start a new story or use smaller panels ({n} tokens each now).")
        # padded like the text-to-image cache where attention is (CUDA): the captured step attends it whole
        slots = bb.padded_cache_len(need, execution.exact) if backbone_module.pads_attention(dev) else need
        if ctx.cache is None:
            cache = bb.new_cache(ids.shape[0], slots)
        else:
            cache = ctx.cache.grown(slots, dev)
        kv = None if execution.exact else cache.length + ids.shape[1]
        hidden = bb.prefill(bb.embed(ids.to(dev)), mask.to(dev), cache, kv)[:, -1]
        check_finite(hidden, bb.dtype, f"after reading panel {len(ctx.segments) + 1}'s prompt")
        noise = noise_for(sampling, make_generator(seed), 1, 1, bb.cfg.token_dim, dev, n)
        loop = TokenLoop(bb, self.pipe.head, sampling, execution)
        tokens = loop.run(hidden, cache, ctx.cfg_mult, n, noise, callback)
        check_finite(tokens, bb.dtype, f"while drawing panel {len(ctx.segments) + 1}")
        loop.feed_last(tokens, cache, ctx.cfg_mult)  # the step a single image skips: the story goes on
        seg = Segment(ids, mask, tokens[0].cpu(), grid)
        new = StoryContext(ctx.cfg_mult, ctx.negative, ctx.style, cache, ctx.segments + [seg])
        return Panel(self.pipe.decode(tokens, grid), tokens.cpu(), new)

    def run(self, prompts: list, *, width: int, height: int, seed: int, sampling: SamplingSettings,
            negative: str = "", positive: str = "", style: str = "", callback=None,
            execution: Execution = Execution()) -> list[Panel]:
        """All panels in one go; panel i uses seed + i (the chained panel nodes do the same)."""
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise SettingsError("The storyboard has no panels: write one panel prompt per line.")
        ctx = self.start(cfg=sampling.cfg, negative=negative, style=style)
        total = self.needed_length(ctx, prompts[0], width, height, positive)
        per_panel = total + 1  # later panels also carry the eoi of the one before
        if per_panel * len(prompts) > self.pipe.backbone.cfg.max_position_embeddings:
            raise SettingsError(f"{len(prompts)} panels of {width}x{height} need about {per_panel * len(prompts)} "
                                f"tokens; the model's limit is {self.pipe.backbone.cfg.max_position_embeddings}.")
        panels = []
        for i, prompt in enumerate(prompts):
            cb = None if callback is None else (lambda d, t, toks, i=i: callback(i, d, t, toks))
            panel = self.add_panel(ctx, prompt, width=width, height=height, seed=seed + i, sampling=sampling,
                                   positive=positive, callback=cb, execution=execution)
            panels.append(panel)
            ctx = panel.context
        return panels

    @torch.inference_mode()
    def recompute(self, ctx: StoryContext) -> StaticKVCache:
        """The same context rebuilt from scratch in one prefill (what reuse saves; benchmarks, tests)."""
        bb, dev = self.pipe.backbone, self.pipe.device
        embeds, masks = [], []
        for seg in ctx.segments:
            embeds.append(bb.embed(seg.ids.to(dev)))
            masks.append(seg.mask.to(dev))
            img = bb.image_in_projector(seg.tokens.to(dev, bb.dtype))[None].expand(seg.ids.shape[0], -1, -1)
            embeds.append(img)
            masks.append(torch.ones(img.shape[:2], dtype=seg.mask.dtype, device=dev))
        e, m = torch.cat(embeds, 1), torch.cat(masks, 1)
        cache = bb.new_cache(e.shape[0], e.shape[1])
        bb.prefill(e, m, cache, e.shape[1])
        return cache
