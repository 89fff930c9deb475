"""Requests in, images and tokens out: text-to-image and editing on the three loaded parts.

The same object serves the ComfyUI nodes, the CLI and the tests, so a seed gives the same
image everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .backbone import Backbone
from .checkpoint import check_compatible
from .devices import check_finite
from .engine import Execution, SamplingSettings, TokenCallback, TokenLoop, noise_for
from .errors import NextStepError, SettingsError
from .flow_head import FlowHead
from .limits import check_count, check_seed, check_size, size_problem, token_grid
from .images import FIT_MODES, fit_image, fit_to_size, to_model_pixels, to_output
from .noise import make_generator
from .prompts import IMAGE_TAG, PromptRows, build_rows, cfg_mult_for, image_prefix, left_pad, row_texts
from .reasoning import ReasoningSettings, forced_suffix, generate_reasoning
from .tokenizer import NextStepTokenizer
from .vae import NextStepVAE, patchify, unpatchify


@dataclass
class Request:
    prompts: list
    width: Optional[int] = 512     # edits: None = the fitted input's size; a size = inputs fitted to it
    height: Optional[int] = 512
    positive: str = ""
    negative: str = ""
    images_per_prompt: int = 1
    seed: int = 42
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    edit_images: Optional[list] = None  # RGB PIL images: one per prompt, or one for all
    fit: str = "bucket"
    fit_base: int = 512
    reasoning: ReasoningSettings = field(default_factory=ReasoningSettings)
    execution: Execution = field(default_factory=Execution)  # how it computes (exact, CUDA graphs, compile)
    # edits: (instructions, fitted images), paired one to one; made with the check, once
    edit_inputs: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.check()
        if self.edit_images:
            self.edit_inputs = self._fit_edit_inputs()

    def check(self) -> None:
        """Raises SettingsError naming the first value a run cannot use and its fix, against the
        ranges of limits.py (the sampling settings checked themselves when they were made). Runs
        once, when the request is made, so a bad value is refused before any work; a request is
        not changed after that (make a new one, e.g. with dataclasses.replace, which checks again)."""
        prompts = list(self.prompts) if self.prompts else []
        if not prompts:
            raise SettingsError("No prompt given: write at least one prompt.")
        if any(not isinstance(p, str) for p in prompts):
            raise SettingsError("Prompts must be text.")
        if not self.edit_images or self.width is not None:  # else the fitted input gives the size
            check_size(self.width, self.height)
        if self.edit_images:
            if self.fit not in FIT_MODES:
                raise SettingsError(f"fit={self.fit!r} is not a fit mode; choose one of {', '.join(FIT_MODES)}.")
            if self.width is None and self.fit != "none":
                problem = size_problem("size", self.fit_base)
                if problem:
                    raise SettingsError(problem)
            if not all(hasattr(img, "size") and hasattr(img, "convert") for img in self.edit_images):
                raise SettingsError("edit_images must be PIL images: open files with nextstep_core.images.open_image, "
                                    "or pass a Load Image node's output to the Edit node.")
            for p in prompts:
                if p.count(IMAGE_TAG) > 1:
                    raise SettingsError(f"The edit instruction {p!r} has {p.count(IMAGE_TAG)} {IMAGE_TAG} tags; use "
                                        "one (or none: the image goes first).")
            n_img = len(self.edit_images)
            if n_img != len(prompts) and 1 not in (n_img, len(prompts)):
                raise SettingsError(f"{len(prompts)} edit instructions but {n_img} input images: give one "
                                    "instruction, one image, or as many of each.")
        check_count(self.images_per_prompt)
        check_seed(self.seed)
        self.reasoning.check()
        if self.reasoning.mode != "off" and self.edit_images:
            raise SettingsError("Self-CoT is for text-to-image; the Edit model was not trained to reason. Turn it off.")

    def _fit_edit_inputs(self) -> tuple[list, list]:
        """Every input image at the size the model reads it, with its instruction. With a size asked
        for, the inputs are fitted to it (StepFun's example); without, the fit mode picks one near
        fit_base and the output follows the input. One batch shares one size, as in the reference."""
        imgs, prompts = list(self.edit_images), list(self.prompts)
        if len(imgs) == 1:
            imgs = imgs * len(prompts)
        elif len(prompts) == 1:
            prompts = prompts * len(imgs)
        if self.width is not None:
            fit = lambda img: fit_to_size(img, self.fit, self.width, self.height)  # noqa: E731
        else:
            fit = lambda img: fit_image(img, self.fit, self.fit_base)  # noqa: E731
        fitted = [fit(imgs[0])]
        for img in imgs[1:]:
            f = fitted[0] if img is imgs[0] else fit(img)
            if f.size != fitted[0].size:
                from PIL import Image
                f = f.resize(fitted[0].size, Image.LANCZOS)
            fitted.append(f)
        return prompts, fitted

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the images the run draws; for an edit without a size, its fitted input's."""
        if self.width is None and self.edit_inputs:
            return self.edit_inputs[1][0].size
        return int(self.width), int(self.height)

    @property
    def batch(self) -> int:
        """Images the run draws."""
        return len(self.edit_inputs[0] if self.edit_inputs else self.prompts) * int(self.images_per_prompt)


PROMPT_TOKENS = 512  # a generous prompt length: memory is planned before the prompt is tokenized


@dataclass(frozen=True)
class RunShape:
    """What one run holds at once, known before it starts: the memory plans (ComfyUI's manager, the
    CLI's low-VRAM mode) and the previews read it, so none of them works it out on its own."""
    width: int
    height: int
    grid: tuple        # (rows, columns) of image tokens
    batch: int         # images drawn together
    cfg_rows: int      # sequences per image: 1 (no guidance), 2 (text guidance) or 3 (text + image)
    context: int       # positions before the image tokens, at most: prompt, edit image, reasoning, story so far
    writes_text: bool = False  # Self-CoT writes its reasoning first, with the LM head

    @property
    def rows(self) -> int:
        return self.batch * self.cfg_rows

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class Result:
    images: torch.Tensor   # [B, H, W, 3] float32 0..1 on the CPU
    tokens: torch.Tensor   # [B, h*w, token_dim] float32, after use_norm, in generation order
    rows: PromptRows
    grid: tuple            # (h_tokens, w_tokens)
    reasoning: list = field(default_factory=list)  # one text per conditional row ('' when Self-CoT is off)


class NextStepPipeline:
    def __init__(self, backbone: Backbone, tokenizer: NextStepTokenizer, head: FlowHead, vae: NextStepVAE):
        check_compatible(backbone, head, vae)
        self.backbone, self.tokenizer, self.head, self.vae = backbone, tokenizer, head, vae

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of image tokens for a width x height image on these parts."""
        return token_grid(width, height, self.backbone.cfg.latent_patch_size * self.vae.cfg.down_factor)

    def shape(self, req: Request) -> RunShape:
        s, think = req.sampling, req.reasoning
        width, height = req.size
        grid = self.grid(width, height)
        editing = req.edit_inputs is not None
        writes_text = think.mode != "off" and think.text is None
        context = PROMPT_TOKENS + (think.max_tokens if writes_text else 0)
        if editing:
            h, w = self.grid(*req.edit_inputs[1][0].size)
            context += h * w
        return RunShape(width, height, grid, req.batch, cfg_mult_for(s.cfg, s.cfg_img, editing), context, writes_text)

    @torch.inference_mode()
    def run(self, req: Request, callback: Optional[TokenCallback] = None, text_callback=None) -> Result:
        """`callback(done, total, tokens)` after every image token; `text_callback(done, limit)` after
        every Self-CoT text token. Either may raise to cancel. The request checked its settings
        when it was made, so they are not checked again here."""
        s, exact = req.sampling, req.execution.exact
        bb, dev = self.backbone, self.device
        prompts, fitted = req.edit_inputs or (list(req.prompts), None)
        width, height = req.size
        grid = self.grid(width, height)
        edit_grid = self.grid(*fitted[0].size) if fitted else None
        think = req.reasoning
        suffix = forced_suffix(think, self.tokenizer) if think.mode != "off" and think.text is not None else ""
        rows = build_rows(self.tokenizer, prompts, images_per_prompt=req.images_per_prompt, positive=req.positive,
                          negative=req.negative, cfg=s.cfg, cfg_img=s.cfg_img, out_tokens_hw=grid,
                          edit_tokens_hw=edit_grid, cond_suffix=suffix)
        texts = [think.text if suffix else ""] * rows.n_cond
        n_tokens = grid[0] * grid[1]
        gen = make_generator(req.seed)
        noise = noise_for(s, gen, req.images_per_prompt, rows.n_cond, bb.cfg.token_dim, dev, n_tokens)
        image_tokens = None
        if fitted is not None:
            image_tokens = self._encode_edit_images(fitted, req.images_per_prompt, rows, noise, exact)
        try:
            if think.mode != "off" and think.text is None:
                cache, hidden, texts = self._prefill_with_reasoning(req, prompts, grid, n_tokens, text_callback)
            else:
                embeds = bb.embed(rows.input_ids.to(dev), image_tokens)
                cache = bb.new_cache(embeds.shape[0], bb.padded_cache_len(embeds.shape[1] + n_tokens, exact))
                hidden = bb.prefill(embeds, rows.attention_mask.to(dev), cache,
                                    None if exact else embeds.shape[1])[:, -1]
            check_finite(hidden, bb.dtype, "after reading the prompt")
            tokens = TokenLoop(bb, self.head, s, req.execution).run(hidden, cache, rows.cfg_mult, n_tokens, noise,
                                                                    callback)
            del cache
            check_finite(tokens, bb.dtype, "while drawing the image")
            images = self.decode(tokens, grid)
        except torch.cuda.OutOfMemoryError:
            raise NextStepError(
                f"Out of GPU memory at {width}x{height} with {rows.input_ids.shape[0]} CFG rows. Use a smaller size "
                "or batch, a lower-memory weight dtype, or free VRAM (other loaded models).") from None
        return Result(images, tokens.cpu(), rows, grid, texts)

    def _prefill_with_reasoning(self, req: Request, prompts, grid, n_tokens, text_callback=None):
        """Conditional rows: caption, span opening, generated text, span closing; then the
        unconditional rows are prefilled right-aligned to the same end, and all rows continue
        with the image prefix. One cache, nothing prefilled twice."""
        bb, tok, s, think = self.backbone, self.tokenizer, req.sampling, req.reasoning
        exact = req.execution.exact
        if bb.lm_head is None:
            from .checkpoint import attach_lm_head
            attach_lm_head(bb)
        dev = self.device
        cond, uncond, _ = row_texts(tok, prompts, images_per_prompt=req.images_per_prompt, positive=req.positive,
                                       negative=req.negative, cfg=s.cfg, cfg_img=s.cfg_img)
        open_ = think.span(tok)[0]
        cond_ids, cond_mask = left_pad(tok, [tok.encode(t + open_) for t in cond])
        prefix = image_prefix(tok, grid)
        lc = cond_ids.shape[1]
        unc = left_pad(tok, [tok.encode(t) for t in uncond]) if uncond else None
        lu = unc[0].shape[1] if unc else 0
        front = max(0, lu - (lc + 1))  # so the unconditional rows fit even if the reasoning is empty
        total_rows = len(cond) + len(uncond)
        cache = bb.new_cache(total_rows, bb.padded_cache_len(front + lc + think.max_tokens + 1 + len(prefix) + n_tokens,
                                                             exact))
        kv = (lambda c, n: None) if exact else (lambda c, n: c.length + n)
        cv = cache.rows(0, len(cond))
        cv.length = front
        hidden = bb.prefill(bb.embed(cond_ids.to(dev)), cond_mask.to(dev), cv, kv(cv, lc))[:, -1]
        ids = generate_reasoning(bb, tok, cv, hidden, think, make_generator(req.seed ^ 0x5EED5EED), exact,
                                 text_callback)
        end = cv.length
        if unc is not None and lu:  # an empty negative prompt leaves nothing to prefill on those rows
            uv = cache.rows(len(cond), total_rows)
            uv.length = end - lu
            bb.prefill(bb.embed(unc[0].to(dev)), unc[1].to(dev), uv, kv(uv, lu))
        cache.length = end
        p = torch.tensor([prefix] * total_rows, device=dev)
        hidden = bb.prefill(bb.embed(p), torch.ones_like(p), cache, kv(cache, len(prefix)))[:, -1]
        return cache, hidden, [tok.decode(r, skip_special_tokens=True) for r in ids]

    def _encode_edit_images(self, fitted, images_per_prompt, rows: PromptRows, noise, exact):
        """Latent tokens for every placeholder row, in row order. The reference draws (and throws
        away) a posterior sample for every encoded row image first; we make the same draw."""
        per_row = [img for img in fitted for _ in range(images_per_prompt)]
        groups = 2 if rows.cfg_mult == 3 else 1
        all_rows = per_row * groups
        w, h = fitted[0].size
        noise.discard((len(all_rows), self.vae.cfg.z_channels, h // self.vae.cfg.down_factor,
                       w // self.vae.cfg.down_factor))
        if exact:  # the reference encodes one stacked batch of every row image (rounding depends on it)
            pixels = torch.stack([to_model_pixels(i) for i in all_rows]).to(self.device)
            latents = self.vae.encode(pixels)
        else:
            pixels = torch.stack([to_model_pixels(i) for i in fitted]).to(self.device)
            uniq = self.vae.encode(pixels)
            index = torch.arange(len(fitted), device=self.device).repeat_interleave(images_per_prompt).repeat(groups)
            latents = uniq[index]
        return patchify(latents, self.backbone.cfg.latent_patch_size).reshape(-1, self.backbone.cfg.token_dim)

    def decode(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """Tokens [B, h*w, D] -> images [B, H, W, 3]; one image at a time to bound VAE memory."""
        out = []
        for b in range(tokens.shape[0]):
            lat = unpatchify(tokens[b:b + 1].to(self.device), grid[0], grid[1], self.backbone.cfg.latent_channels,
                             self.backbone.cfg.latent_patch_size)
            out.append(to_output(self.vae.decode(lat)))
        return torch.cat(out)
