"""The ranges a run's settings must lie in, in one table.

The engine checks a request against it once, the node widgets take their min, max and step
from it, and the command line quotes it, so a bound or its message cannot differ between the
canvas, the CLI and the engine. What a server accepts is the server's rule (remote/payload.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .errors import SettingsError

PIXELS_PER_TOKEN = 16  # one image token is 16x16 pixels
MAX_SIZE = 2048
MAX_SEED = 2 ** 64 - 1  # noise is drawn from a 64-bit seed


@dataclass(frozen=True)
class Range:
    """One number setting: its name as users see it, its bounds, and what the model cards use."""
    name: str
    lo: float
    hi: float
    usual: str
    step: float = 1

    def problem(self, value) -> Optional[str]:
        """Why `value` cannot be used, or None. NaN is refused by name: every comparison with it is
        false, so it passes a min/max check, and sampled with it every token is NaN (a black image)."""
        fix = f"Use a value between {self.lo:g} and {self.hi:g} (usually {self.usual})."
        try:
            v = float(value)
        except (TypeError, ValueError):
            return f"{self.name}={value!r} is not a number. {fix}"
        if not math.isfinite(v):
            return f"{self.name}={value} is not a finite number. {fix}"
        if v < self.lo:
            return f"{self.name}={value} is below {self.lo:g}. {fix}"
        if v > self.hi:
            return f"{self.name}={value} is above {self.hi:g}. {fix}"
        return None

    def check(self, value) -> None:
        problem = self.problem(value)
        if problem:
            raise SettingsError(problem)


CFG = Range("cfg", 1.0, 30.0, "7.5; 1 = guidance off", 0.1)
CFG_IMG = Range("cfg_img", 1.0, 30.0, "2.0 for edits; 1 = off", 0.1)
SHIFT = Range("timesteps_shift", 0.05, 20.0, "1.0, or 3.2 for edits", 0.05)
STEPS = Range("steps", 1, 200, "28 for NextStep-1, 30 for 1.1, 50 for edits")


def nearest_sizes(v: int) -> list[int]:
    """The one or two valid sizes next to `v`."""
    if v <= PIXELS_PER_TOKEN:
        return [PIXELS_PER_TOKEN]
    if v >= MAX_SIZE:
        return [MAX_SIZE]
    lo = v // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
    return sorted({lo, lo + PIXELS_PER_TOKEN})


def size_problem(name: str, value) -> Optional[str]:
    """Why a width, height or base size cannot be used, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and PIXELS_PER_TOKEN <= value <= MAX_SIZE \
            and value % PIXELS_PER_TOKEN == 0:
        return None
    try:
        near = " or ".join(str(x) for x in nearest_sizes(int(value)))
    except (TypeError, ValueError, OverflowError):
        near = str(512)
    return (f"{name}={value} is not a multiple of {PIXELS_PER_TOKEN} between {PIXELS_PER_TOKEN} and {MAX_SIZE} "
            f"(one image token is {PIXELS_PER_TOKEN}x{PIXELS_PER_TOKEN} pixels): use {near}.")


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        problem = size_problem(name, value)
        if problem:
            raise SettingsError(problem)


def token_grid(width: int, height: int, pixels_per_token: int = PIXELS_PER_TOKEN) -> tuple[int, int]:
    """(rows, columns) of image tokens of a width x height image."""
    return height // pixels_per_token, width // pixels_per_token


def check_seed(seed) -> None:
    if not 0 <= int(seed) <= MAX_SEED:
        raise SettingsError(f"seed={seed} is outside 0..2^64-1: use a seed in that range.")


def check_count(images_per_prompt) -> None:
    if int(images_per_prompt) < 1:
        raise SettingsError(f"images per prompt = {images_per_prompt}; use 1 or more.")
