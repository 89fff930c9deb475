"""Teacher-forced token error: how far a variant of the backbone (quantized weights, another kernel)
moves each image token when it is fed the same previous tokens and the same noise as a reference.
bench/quant_error.py and the tests of the weight formats measure with it; the engine does not.

Comparing two free-running generations measures chaos rather than the variant: on random weights
a 1e-6 difference at the first token grows to O(1) within ~60 tokens. Feeding both the reference
tokens isolates the error each step adds, which is what a quality bound can be stated on.
"""
from __future__ import annotations

import torch

from nextstep_core.engine import SamplingSettings, TokenLoop, noise_for
from nextstep_core.noise import make_generator
from nextstep_core.prompts import PromptRows


@torch.inference_mode()
def teacher_forced(backbone, head, rows: PromptRows, tokens: torch.Tensor, settings: SamplingSettings,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens` [batch, n, dim]: a reference run's image tokens. -> (each token re-sampled from the
    backbone's state after the reference's previous tokens [batch, n, dim] float32, the final-norm
    hidden states that conditioned them [rows, n, hidden]). With the run's seed (text-to-image, one
    image per prompt) every token gets the noise the run drew for it, so the reference backbone
    reproduces the run up to prefill-vs-step rounding."""
    dev = backbone.device
    batch, n, dim = tokens.shape
    ids, mask = rows.input_ids.to(dev), rows.attention_mask.to(dev)
    images = backbone.image_in_projector(tokens[:, :-1].to(dev, backbone.dtype)).repeat(rows.cfg_mult, 1, 1)
    embeds = torch.cat([backbone.embed(ids), images.to(backbone.dtype)], dim=1)
    mask = torch.cat([mask, torch.ones(images.shape[:2], dtype=mask.dtype, device=dev)], dim=1)
    cache = backbone.new_cache(embeds.shape[0], embeds.shape[1])
    hidden = backbone.prefill(embeds, mask, cache, embeds.shape[1])[:, ids.shape[1] - 1:]
    loop = TokenLoop(backbone, head, settings)
    loop.schedule(embeds.shape[0], n, dev, rows.cfg_mult)
    noise = noise_for(settings, make_generator(seed), 1, batch, dim, dev, n)
    out = [loop.sample_token(hidden[:, k], noise.for_token(k), loop.scales[k], rows.cfg_mult).to(torch.float32)
           for k in range(n)]
    return torch.stack(out, dim=1), hidden.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a - b|| / ||b|| over the last dimension, per token."""
    a, b = a.float(), b.float()
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-12)
