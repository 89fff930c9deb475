"""What a generation command writes: PNGs, one name per image of a batch, and the tokens file.

The local run (cli.py) and the run on servers (remote/command.py) both write here, each file
whole or not at all (atomic_write.py).
"""
from __future__ import annotations

import os

from .atomic_write import atomic_file


def output_paths(out: str, n: int) -> list[str]:
    """`out` for one image; NAME-0.png, NAME-1.png, ... for several."""
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-{i}{ext or '.png'}" for i in range(n)]


def save_png(img, path: str) -> None:
    """`img` [H, W, 3] float 0..1."""
    from PIL import Image
    arr = (img.clamp(0, 1) * 255).round().byte().numpy()
    with atomic_file(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def save_tokens(path: str, tokens, images) -> None:
    """--tokens-out: `tokens` [batch, h*w, 64] and `images` [batch, H, W, 3], float32."""
    from safetensors.torch import save_file
    with atomic_file(path) as tmp:
        save_file({"tokens": tokens.float().contiguous(), "images": images.float().contiguous()}, tmp)
