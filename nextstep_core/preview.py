"""A picture of an image while its tokens are still being drawn: what a host shows as progress.

Only the token rows that exist are decoded (the rest stays grey), so a preview costs a fraction
of the final decode and the host can rate-limit it by that cost.
"""
from __future__ import annotations

import torch

from .images import to_output
from .vae import unpatchify

GREY = 0.5


@torch.inference_mode()
def partial_image(vae, backbone, tokens: torch.Tensor, done: int, grid: tuple):
    """tokens [n, D] of one image, the first `done` of them sampled -> RGB PIL image of the whole
    grid, grey where no token exists yet."""
    from PIL import Image
    h, w = grid
    rows = -(-done // w)
    part = tokens[: rows * w].clone()
    part[done:] = 0  # the rest of the buffer holds no token yet
    lat = unpatchify(part[None].to(vae.device), rows, w, backbone.cfg.latent_channels,
                     backbone.cfg.latent_patch_size)
    pixels = to_output(vae.decode(lat))[0]
    px = pixels.shape[0] // rows
    canvas = torch.full((h * px, w * px, 3), GREY)
    canvas[: rows * px] = pixels
    in_last_row = done - (rows - 1) * w
    canvas[(rows - 1) * px: rows * px, in_last_row * px:] = GREY
    return Image.fromarray(canvas.mul(255).round().to(torch.uint8).numpy())
