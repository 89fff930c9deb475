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
from ..nextstep_core.api import partial_image

MIN_PREVIEW_INTERVAL = 1.0   # seconds between previews
PREVIEW_COST_FACTOR = 10     # ... and at least ten times what the last preview took


class TokenProgress:
    """callback(done, total, tokens) for `NextStepPipeline.run`."""

    def __init__(self, vae, backbone, grid: tuple, node_id=None, previews: bool = True):
        self.vae, self.backbone, self.grid = vae, backbone, grid
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
            image = partial_image(self.vae, self.backbone, tokens[0], done, self.grid)
            cost = time.monotonic() - started
            self.next_preview = time.monotonic() + max(MIN_PREVIEW_INTERVAL, PREVIEW_COST_FACTOR * cost)
            preview = ("JPEG", image, bridge.preview_size())
        self.bar.update_absolute(done, total, preview)
