"""Prompt rows exactly as the official pipeline builds them.

No chat template, no system prompt, no BOS: captions are raw text, left-padded with [PAD], then
`<|image_area|>h*w` + boi appended to every row. CFG adds unconditional rows below the
conditional ones: [cond][negative] for text-to-image, [image+instruction][image+negative]
[negative] for editing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenizer import IMAGE_AREA, NextStepTokenizer

IMAGE_TAG = "<image>"


@dataclass
class PromptRows:
    input_ids: torch.Tensor       # [rows, L] int64, left padded
    attention_mask: torch.Tensor  # [rows, L] int64, 0 on pads
    cfg_mult: int                 # 1, 2 or 3 row groups
    n_cond: int                   # rows per group = captions x images per caption
    texts: list                   # the row texts before tokenizing (for debugging and tests)


def image_area(h_tokens: int, w_tokens: int) -> str:
    return f"{IMAGE_AREA}{h_tokens}*{w_tokens}"


def image_block(tok: NextStepTokenizer, h_tokens: int, w_tokens: int) -> str:
    """What an `<image>` tag in a caption becomes: area, boi, one placeholder per token, eoi."""
    ids = [tok.boi_id] + [tok.placeholder_id] * (h_tokens * w_tokens) + [tok.eoi_id]
    return image_area(h_tokens, w_tokens) + tok.decode(ids)


def cfg_mult_for(cfg: float, cfg_img: float, editing: bool) -> int:
    """Row groups. The reference pipeline branches on `!= 1` while its head counts `> 1`; inputs
    below 1 are rejected earlier, so both agree here. Without text CFG no image CFG is applied,
    as in the reference (its rows are built only for cfg != 1)."""
    if cfg == 1.0:
        return 1
    return 3 if (editing and cfg_img != 1.0) else 2


def row_texts(tok: NextStepTokenizer, captions: list[str], *, images_per_prompt: int, positive: str | None,
              negative: str | None, cfg: float, cfg_img: float, edit_tokens_hw: tuple[int, int] | None = None,
              cond_suffix: str = "") -> tuple[list[str], list[str], int]:
    """-> (conditional row texts, unconditional row texts, cfg_mult) before tokenizing. The captions
    are a checked request's (pipeline.Request: text, at most one image tag in an edit)."""
    editing = edit_tokens_hw is not None
    block = ""
    if editing:
        block = image_block(tok, *edit_tokens_hw)
        rows = []
        for c in captions:
            if IMAGE_TAG not in c:
                c = IMAGE_TAG + c  # the official examples put the image first
            rows.append(c.replace(IMAGE_TAG, block))
        captions = rows
    cond = [c for c in captions for _ in range(images_per_prompt)]
    if positive:
        cond = [f"{c} {positive}" for c in cond]
    cond = [c + cond_suffix for c in cond]
    neg = negative or ""
    mult = cfg_mult_for(cfg, cfg_img, editing)
    uncond = []
    if mult == 3:
        uncond = [block + neg] * len(cond) + [neg] * len(cond)
    elif mult == 2:
        uncond = [neg] * len(cond)
    return cond, uncond, mult


def left_pad(tok: NextStepTokenizer, encoded: list[list[int]], suffix: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists with [PAD] to one length and append `suffix` to every row."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width + len(suffix)), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        if e:
            ids[r, width - len(e):width] = torch.tensor(e)
        mask[r, width - len(e):] = 1
    if suffix:
        ids[:, width:] = torch.tensor(list(suffix))
    return ids, mask


def image_prefix(tok: NextStepTokenizer, out_tokens_hw: tuple[int, int]) -> list[int]:
    """`<|image_area|>h*w` tokenized on its own, then boi: what opens every generated image."""
    return tok.encode(image_area(*out_tokens_hw)) + [tok.boi_id]


def build_rows(tok: NextStepTokenizer, captions: list[str], *, images_per_prompt: int, positive: str | None,
               negative: str | None, cfg: float, cfg_img: float, out_tokens_hw: tuple[int, int],
               edit_tokens_hw: tuple[int, int] | None = None, cond_suffix: str = "") -> PromptRows:
    cond, uncond, mult = row_texts(tok, captions, images_per_prompt=images_per_prompt, positive=positive,
                                   negative=negative, cfg=cfg, cfg_img=cfg_img, edit_tokens_hw=edit_tokens_hw,
                                   cond_suffix=cond_suffix)
    texts = cond + uncond
    ids, mask = left_pad(tok, [tok.encode(t) for t in texts], image_prefix(tok, out_tokens_hw))
    return PromptRows(ids, mask, mult, len(cond), texts)
