"""Input and output images: reading what users actually have (EXIF-rotated phone photos, RGBA
PNGs, grayscale scans) and fitting them to a size the model accepts (multiples of 16)."""
from __future__ import annotations

import math

import torch

from .errors import InputImageError, SettingsError
from .limits import PIXELS_PER_TOKEN as MULTIPLE, nearest_sizes

# Official training aspect buckets (h, w) in 16-px tokens at 256 px; scaled by size / 256.
BUCKETS = [(8, 32), (9, 28), (10, 25), (11, 23), (12, 21), (13, 19), (14, 18), (15, 17), (16, 16), (17, 15),
           (18, 14), (19, 13), (21, 12), (23, 11), (25, 10), (28, 9), (32, 8)]
FIT_MODES = ("bucket", "center-crop", "resize", "none")


def bucket_sizes(base: int = 512) -> list[tuple[int, int]]:
    """(height, width) in pixels of every aspect bucket at `base` px (base 512 -> 256x1024 ... 512x512)."""
    return [(round(h * base / 256) * MULTIPLE, round(w * base / 256) * MULTIPLE) for h, w in BUCKETS]


def nearest_bucket(height: int, width: int, base: int = 512) -> tuple[int, int]:
    ratio = math.log(height / width)
    return min(bucket_sizes(base), key=lambda hw: abs(math.log(hw[0] / hw[1]) - ratio))


def open_image(path_or_image):
    """-> RGB PIL image. Applies EXIF rotation, puts transparency on white, converts L/P/CMYK."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
        img.load()
    except FileNotFoundError:
        raise InputImageError(f"Input image {path_or_image} does not exist.") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputImageError(f"Input image {path_or_image} cannot be read as an image ({exc}). Use a PNG, JPEG "
                              "or WebP file.") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGBA", img.size, "white")
        img = Image.alpha_composite(bg, img)
    return img.convert("RGB")


def fit_image(img, mode: str, base: int = 512):
    """Fit an RGB PIL image to a valid size. bucket: nearest official aspect bucket at `base`
    (scale to cover, centre crop; what the official edit demo does); center-crop: base x base;
    resize: keep the aspect, round each side to a multiple of 16 near `base`; none: must already fit."""
    from PIL import Image
    w, h = img.size
    if mode == "none":
        if w % MULTIPLE or h % MULTIPLE:
            raise SettingsError(f"The input image is {w}x{h}; with fit 'none' both sides must be multiples of 16 "
                                f"(e.g. {nearest_sizes(w)[0]}x{nearest_sizes(h)[0]}). Pick another fit mode.")
        return img
    if mode == "resize":
        scale = base / math.sqrt(w * h)
        tw, th = (max(MULTIPLE, round(v * scale / MULTIPLE) * MULTIPLE) for v in (w, h))
        return img.resize((tw, th), Image.LANCZOS)
    if mode == "center-crop":
        th = tw = base
    elif mode == "bucket":
        th, tw = nearest_bucket(h, w, base)
    else:
        raise SettingsError(f"Unknown fit mode {mode!r}; choose one of {', '.join(FIT_MODES)}.")
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = img.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - tw) // 2, (rh - th) // 2
    return img.crop((left, top, left + tw, top + th))


def fit_to_size(img, mode: str, width: int, height: int):
    """Fit an RGB PIL image to an edit whose output size was given. resize: exactly width x height
    (what StepFun's edit example does: `image.resize(hw)`, PIL's default bicubic filter); bucket and
    center-crop: scale to cover width x height and centre-crop (the aspect kept); none: as it is
    (its sides must be multiples of 16; it may differ from the output size). The size and the mode
    are the request's, checked when it was made."""
    from PIL import Image
    if mode == "none":
        return fit_image(img, "none")
    if mode == "resize":
        return img if img.size == (width, height) else img.resize((width, height), Image.BICUBIC)
    w, h = img.size  # bucket or center-crop (the request checked the mode)
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - width) // 2, (rh - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_model_pixels(img) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    import numpy as np
    arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
    return (arr - 0.5) / 0.5


def from_hwc_float(t: torch.Tensor):
    """[H, W, 3] float 0..1 (ComfyUI's IMAGE layout) -> RGB PIL."""
    from PIL import Image
    arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise InputImageError(f"Expected an image tensor [H, W, C], got shape {tuple(t.shape)}.")
    img = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
    return open_image(img)


def to_output(pixels: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] float32 0..1 (the official (x+1)/2, clamped)."""
    return (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()
