"""The engine's text-to-image request as vLLM-Omni's `ImageGenerationRequest`, its answer back
as pixels, and the checks that keep a request the server would refuse from being sent."""
from __future__ import annotations

import base64
import binascii
import io

import torch

from ..errors import SettingsError
from .servers import ServerError

SERVER_MAX_SEED = 2 ** 63 - 1  # the server's seed is an int64
MAX_CFG = 20.0  # ImageGenerationRequest.guidance_scale <= 20
SCHEDULES = ("constant", "linear")  # what NextStep11Pipeline implements
SAMPLER = "nextstep1.1"  # the only sampler the server runs
# its steps (<= 200) are the engine's own range, limits.STEPS, checked where the settings are made


def check_request(req) -> int:
    """Raises SettingsError for what only a local run can do or the server would refuse;
    -> the number of images."""
    prompts = list(req.prompts or [])
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise SettingsError("No prompt given: write what to draw (every prompt sent to a server must have text).")
    if req.edit_images is not None:
        raise SettingsError("vLLM-Omni serves NextStep-1.1 text-to-image only; edits run locally (connect the "
                            "three NextStep loaders, or leave out --server).")
    if req.reasoning.mode != "off":
        raise SettingsError("Self-CoT runs locally only (vLLM-Omni has no reasoning step for NextStep): turn it off, "
                            "or draw locally.")
    # sizes and counts are the engine's rules, which the request checked when it was made
    s = req.sampling
    if not 1.0 <= s.cfg <= MAX_CFG:
        raise SettingsError(f"cfg={s.cfg}: vLLM-Omni takes cfg from 1 (guidance off) to {MAX_CFG:g}; the model card "
                            "uses 7.5.")
    if s.cfg_schedule not in SCHEDULES:
        raise SettingsError(f"cfg_schedule={s.cfg_schedule!r} runs locally only; vLLM-Omni has "
                            f"{' and '.join(SCHEDULES)}.")
    if s.sampler != SAMPLER:
        raise SettingsError(f"sampler={s.sampler!r} runs locally only; vLLM-Omni samples with NextStep-1.1's own "
                            f"sampler ({SAMPLER}; 'auto' on the node).")
    if req.execution.exact or req.execution.compile:
        raise SettingsError("exact and compile are settings of a local run; a server uses its own kernels.")
    count = len(prompts) * int(req.images_per_prompt)
    if not 0 <= int(req.seed) <= SERVER_MAX_SEED - (count - 1):
        raise SettingsError(f"seed={req.seed}: image i is drawn with seed + i, and vLLM-Omni takes seeds up to "
                            f"2^63-1; use a seed from 0 to {SERVER_MAX_SEED - (count - 1)}.")
    return count


def image_jobs(req) -> list[tuple[int, str, int]]:
    """(image index, prompt, seed) in output order: prompt by prompt, images of a prompt together,
    as a local batch; image i gets seed + i, so the images do not depend on who draws them."""
    n = int(req.images_per_prompt)
    return [(p * n + j, prompt, int(req.seed) + p * n + j) for p, prompt in enumerate(req.prompts) for j in range(n)]


def request_body(req, prompt: str, seed: int, model: str) -> dict:
    s = req.sampling
    return {
        "model": model,
        "prompt": prompt,
        "negative_prompt": req.negative or "",
        "size": f"{int(req.width)}x{int(req.height)}",
        "n": 1,
        "num_inference_steps": int(s.steps),
        "guidance_scale": float(s.cfg),
        "seed": int(seed),
        "response_format": "b64_json",
        "extra_params": {
            "timesteps_shift": float(s.shift),
            "use_norm": bool(s.use_norm),
            "cfg_schedule": s.cfg_schedule,
            "positive_prompt": req.positive or "",
        },
    }


def decode_image(payload, url: str, width: int, height: int) -> torch.Tensor:
    """`data[0].b64_json` (a PNG) -> [H, W, 3] float32 0..1."""
    from PIL import Image, UnidentifiedImageError
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict) or not data[0].get("b64_json"):
        got = f"{len(data)} images" if isinstance(data, list) else "no data list"
        raise ServerError(f"{url} answered without the one base64 image asked for ({got}); is it a vLLM-Omni "
                          "server serving NextStep-1.1?")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"], validate=True)))
        img.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        raise ServerError(f"{url} sent an image that cannot be read ({type(exc).__name__}: {exc}).") from None
    if img.size != (width, height):
        raise ServerError(f"{url} sent a {img.size[0]}x{img.size[1]} image for a {width}x{height} request.")
    import numpy as np
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).float().div_(255)
