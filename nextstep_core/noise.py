"""Seeded noise in the official draw order, drawn on the CPU and moved to the device.

The official pipeline draws from the global RNG: per image token one (noise_repeat, 64) start
noise and one more per SDE step, each tiled with `.repeat(B / noise_repeat, 1)` (so images of
different captions share noise). Drawing the same numbers from a private CPU generator makes a
seed give the same image on CPU, CUDA and MPS, and drawing a chunk of tokens at once keeps the
generator out of the token loop (a float32 draw of n*64 values equals n draws of 64).
"""
from __future__ import annotations

import torch


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) % (2 ** 64))


class TokenNoise:
    def __init__(self, generator: torch.Generator, draws_per_token: int, noise_repeat: int, rows: int,
                 dim: int, device, total_tokens: int, chunk_tokens: int = 64):
        if rows % noise_repeat:
            raise ValueError(f"batch {rows} is not a multiple of images per caption {noise_repeat}")
        self.gen, self.draws, self.nr, self.tile = generator, draws_per_token, noise_repeat, rows // noise_repeat
        self.dim, self.device, self.chunk = dim, torch.device(device), chunk_tokens
        self.total = total_tokens  # never draw past the last token: a later panel may reuse the generator
        self._buf: torch.Tensor | None = None
        self._first = 0

    def discard(self, shape) -> None:
        """Consume a draw the reference makes and throws away (the deterministic VAE posterior)."""
        torch.randn(shape, generator=self.gen, dtype=torch.float32)

    def for_token(self, k: int) -> torch.Tensor:
        """[draws, rows, dim] float32 on the device for image token k (tokens asked for in order)."""
        if self._buf is None or k >= self._first + self._buf.shape[0]:
            n = min(self.chunk, self.total - k)
            raw = torch.randn(n, self.draws, self.nr, self.dim, generator=self.gen, dtype=torch.float32)
            if self.device.type == "cuda":
                raw = raw.pin_memory()
            self._buf = raw.to(self.device, non_blocking=True)
            self._first = k
        return self._buf[k - self._first].repeat(1, self.tile, 1)
