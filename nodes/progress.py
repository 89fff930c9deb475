"""The per-token hook: progress bar, Cancel, and a live preview that fills in patch by patch.

The engine calls it after every image token. Cancel is checked first, every token, so a press
stops generation before the next token starts. The preview decodes only the token rows that
exist (the rest stays grey) and is rate-limited by its own cost, so watching never slows the
run by more than about a tenth.
"""
from __future__ import annotations

import time

import torch

from . import bridge
from ..nextstep_core.images import to_output
from ..nextstep_core.vae import unpatchify

GREY = 0.5
MIN_PREVIEW_INTERVAL = 1.0   # seconds between previews
PREVIEW_COST_FACTOR = 10     # ... and at least ten times what the last preview took


@torch.inference_mode()
def partial_image(vae, tokens: torch.Tensor, done: int, grid: tuple, channels: int, patch: int):
    """tokens [n, D] of one image, the first `done` of them sampled -> RGB PIL image, grey where
    no token exists yet."""
    from PIL import Image
    h, w = grid
    rows = -(-done // w)
    part = tokens[: rows * w].clone()
    part[done:] = 0  # the rest of the buffer holds no token yet
    lat = unpatchify(part[None].to(vae.device), rows, w, channels, patch)
    pixels = to_output(vae.decode(lat))[0]
    px = pixels.shape[0] // rows
    canvas = torch.full((h * px, w * px, 3), GREY)
    canvas[: rows * px] = pixels
    in_last_row = done - (rows - 1) * w
    canvas[(rows - 1) * px: rows * px, in_last_row * px:] = GREY
    return Image.fromarray(canvas.mul(255).round().to(torch.uint8).numpy())


class TokenProgress:
    """callback(done, total, tokens) for `NextStepPipeline.run`."""

    def __init__(self, vae, backbone, grid: tuple, node_id=None, previews: bool = True):
        self.vae, self.grid = vae, grid
        self.channels, self.patch = backbone.cfg.latent_channels, backbone.cfg.latent_patch_size
        self.total = grid[0] * grid[1]
        self.bar = bridge.progress_bar(self.total, node_id)
        self.check_interrupt = bridge.interrupt_check()
        self.previews = previews and self.bar is not None
        self.next_preview = 0.0

    def __call__(self, done: int, total: int, tokens: torch.Tensor) -> None:
        self.check_interrupt()
        if self.bar is None:
            return
        preview = None
        # the last token always gets a preview, so a finished node does not keep a half-grey picture
        if self.previews and (done == total or time.monotonic() >= self.next_preview):
            started = time.monotonic()
            image = partial_image(self.vae, tokens[0], done, self.grid, self.channels, self.patch)
            cost = time.monotonic() - started
            self.next_preview = time.monotonic() + max(MIN_PREVIEW_INTERVAL, PREVIEW_COST_FACTOR * cost)
            preview = ("JPEG", image, bridge.preview_size())
        self.bar.update_absolute(done, total, preview)
