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
from .pipeline import PROMPT_TOKENS, NextStepPipeline, Request, RunShape
from .prompts import cfg_mult_for, image_prefix, left_pad

MODES = ("story", "edit chain")


@dataclass(frozen=True)
class StorySettings:
    """What every panel of one story shares. Checked once, when the story starts: a panel adds only
    its prompt and seed."""
    width: int
    height: int
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    positive: str = ""
    negative: str = ""
    style: str = ""  # character and style text put before every panel's prompt
    # story: every panel continues one sequence; edit chain: each panel an edit of the one before
    # (the edit model), the first drawn from text
    mode: str = "story"
    execution: Execution = field(default_factory=Execution)

    def __post_init__(self):
        check_size(self.width, self.height)
        if self.mode not in MODES:
            raise SettingsError(f"mode={self.mode!r}; choose one of {', '.join(MODES)}.")
        for name in ("positive", "negative", "style"):  # an unconnected optional text is no text
            object.__setattr__(self, name, getattr(self, name) or "")

    @property
    def cfg_mult(self) -> int:
        """The story's CFG rows (conditional, then negative): one layout for every panel."""
        return cfg_mult_for(self.sampling.cfg, 1.0, editing=False)


@dataclass
class Segment:
    ids: torch.Tensor          # [rows, L] text ids of this panel (left padded per panel), then the image prefix
    mask: torch.Tensor         # [rows, L]
    tokens: torch.Tensor       # [n, token_dim] the panel's image tokens (float32, CPU)
    grid: tuple


@dataclass
class StoryContext:
    """Everything needed to continue a story: its settings, and the sequence so far (story mode: the
    cache holds it whole, eoi included) or the last panel (edit chain). Never changed: a panel
    makes a new context."""
    settings: StorySettings
    cache: Optional[StaticKVCache] = None
    segments: list = field(default_factory=list)
    last_image: Optional[torch.Tensor] = None  # edit chain: [1, H, W, 3], the panel the next one edits
    panels: int = 0

    @property
    def cfg_mult(self) -> int:
        return self.settings.cfg_mult

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def offloaded(self) -> "StoryContext":
        """The same story with its cache in CPU RAM (the next panel copies it back)."""
        if self.cache is None or self.cache.valid.device.type == "cpu":
            return self
        return replace(self, cache=self.cache.offloaded())


def styled(style: str, prompt: str) -> str:
    """A panel's caption: the story's character and style text, then the panel's prompt."""
    return f"{style} {prompt}".strip() if style else prompt


@dataclass
class Panel:
    image: torch.Tensor        # [1, H, W, 3]
    tokens: torch.Tensor       # [1, n, token_dim]
    context: StoryContext      # the story including this panel


class Storyboard:
    def __init__(self, pipeline: NextStepPipeline):
        self.pipe = pipeline

    @staticmethod
    def start(settings: StorySettings) -> StoryContext:
        return StoryContext(settings)

    def shape(self, ctx: StoryContext, panels: int = 1) -> RunShape:
        """What the next `panels` panels hold at most at once (memory plans): each continues the
        story so far (story mode), or edits the one before (edit chain, from the second panel)."""
        st = ctx.settings
        grid = self.pipe.grid(st.width, st.height)
        n = grid[0] * grid[1]
        if st.mode == "edit chain":
            editing = ctx.last_image is not None or panels > 1
            return RunShape(st.width, st.height, grid, 1, cfg_mult_for(st.sampling.cfg, st.sampling.cfg_img, editing),
                            PROMPT_TOKENS + (n if editing else 0))
        return RunShape(st.width, st.height, grid, 1, ctx.cfg_mult,
                        ctx.length + panels * PROMPT_TOKENS + (panels - 1) * n)

    def _panel_ids(self, ctx: StoryContext, prompt: str, grid) -> tuple[torch.Tensor, torch.Tensor]:
        tok, st = self.pipe.tokenizer, ctx.settings
        text = styled(st.style, prompt)
        if st.positive:
            text = f"{text} {st.positive}"
        texts = [text] + ([st.negative] if ctx.cfg_mult == 2 else [])
        lead = [tok.eoi_id] if ctx.segments else []  # close the previous image
        return left_pad(tok, [lead + tok.encode(t) for t in texts], image_prefix(tok, grid))

    def add_panel(self, ctx: StoryContext, prompt: str, *, seed: int,
                  callback: Optional[TokenCallback] = None) -> Panel:
        """The next panel of the story, in its mode; `ctx` itself is left as it was."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise SettingsError(f"Panel {ctx.panels + 1} has an empty prompt: write what it shows.")
        if ctx.settings.mode == "edit chain" and ctx.last_image is not None:
            return self._edit_panel(ctx, prompt, seed, callback)
        panel = self._story_panel(ctx, prompt, seed, callback)
        if ctx.settings.mode == "edit chain":  # the first panel, drawn from text: only its image goes on
            panel.context = replace(ctx, last_image=panel.image, panels=ctx.panels + 1)
        return panel

    def _edit_panel(self, ctx: StoryContext, prompt: str, seed: int, callback) -> Panel:
        """An edit of the previous panel, at its size (the request runs as any other edit)."""
        st = ctx.settings
        req = Request([styled(st.style, prompt)], None, None, positive=st.positive, negative=st.negative,
                      seed=int(seed), sampling=st.sampling, edit_images=[from_hwc_float(ctx.last_image[0])],
                      fit="none", execution=st.execution)
        result = self.pipe.run(req, callback)
        return Panel(result.images, result.tokens, replace(ctx, last_image=result.images, panels=ctx.panels + 1))

    @torch.inference_mode()
    def _story_panel(self, ctx: StoryContext, prompt: str, seed: int, callback) -> Panel:
        st, execution = ctx.settings, ctx.settings.execution
        bb, dev = self.pipe.backbone, self.pipe.device
        grid = self.pipe.grid(st.width, st.height)
        ids, mask = self._panel_ids(ctx, prompt, grid)
        n = grid[0] * grid[1]
        need = ctx.length + ids.shape[1] + n
        limit = bb.cfg.max_position_embeddings
        if need > limit:
            raise SettingsError(
                f"Panel {ctx.panels + 1} would make the story {need} tokens long; the model's limit is "
                f"{limit}. Start a new story or use smaller panels ({n} tokens each now).")
        # padded like the text-to-image cache where attention is (CUDA): the captured step attends it whole
        slots = bb.padded_cache_len(need, execution.exact) if backbone_module.pads_attention(dev) else need
        if ctx.cache is None:
            cache = bb.new_cache(ids.shape[0], slots)
        else:
            cache = ctx.cache.grown(slots, dev)
        kv = None if execution.exact else cache.length + ids.shape[1]
        hidden = bb.prefill(bb.embed(ids.to(dev)), mask.to(dev), cache, kv)[:, -1]
        check_finite(hidden, bb.dtype, f"after reading panel {ctx.panels + 1}'s prompt")
        noise = noise_for(st.sampling, make_generator(seed), 1, 1, bb.cfg.token_dim, dev, n)
        loop = TokenLoop(bb, self.pipe.head, st.sampling, execution)
        tokens = loop.run(hidden, cache, ctx.cfg_mult, n, noise, callback)
        check_finite(tokens, bb.dtype, f"while drawing panel {ctx.panels + 1}")
        loop.feed_last(tokens, cache, ctx.cfg_mult)  # the step a single image skips: the story goes on
        seg = Segment(ids, mask, tokens[0].cpu(), grid)
        new = replace(ctx, cache=cache, segments=ctx.segments + [seg], panels=ctx.panels + 1)
        return Panel(self.pipe.decode(tokens, grid), tokens.cpu(), new)

    def run(self, prompts: list, settings: StorySettings, *, seed: int, callback=None) -> list[Panel]:
        """All panels in one go; panel i uses seed + i (the chained panel nodes do the same).
        `callback(panel index, done, total, tokens)`."""
        prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
        if not prompts:
            raise SettingsError("The storyboard has no panels: write one panel prompt per line.")
        ctx = self.start(settings)
        if settings.mode == "story":
            grid = self.pipe.grid(settings.width, settings.height)
            per_panel = self._panel_ids(ctx, prompts[0], grid)[0].shape[1] + 1 + grid[0] * grid[1]
            limit = self.pipe.backbone.cfg.max_position_embeddings
            if per_panel * len(prompts) > limit:  # later panels also carry the eoi of the one before
                raise SettingsError(f"{len(prompts)} panels of {settings.width}x{settings.height} need about "
                                    f"{per_panel * len(prompts)} tokens; the model's limit is {limit}.")
        panels = []
        for i, prompt in enumerate(prompts):
            cb = None if callback is None else (lambda d, t, toks, i=i: callback(i, d, t, toks))
            panel = self.add_panel(ctx, prompt, seed=seed + i, callback=cb)
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
