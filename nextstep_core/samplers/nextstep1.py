"""NextStep-1's own sampler (the August 2025 release, NextStep-1-Large and its Edit model): N-1
SDE steps between N evaluation times on linspace(0, 0.96), then one deterministic Euler step of
0.04 to t = 1."""
from __future__ import annotations

import torch

from .base import Sampler
from .flow import sde_coefficients, sde_scalars, sde_steps, shift_time

LAST_STEP = 0.04  # the final Euler step; the grid stops short of 1 by this much


class NextStep1(Sampler):
    name = "nextstep1"
    description = "SDE steps then a final Euler step (Aug 2025 release)"
    default_for = ("nextstep1-large", "nextstep1-large-pretrain", "nextstep1-large-edit")
    min_steps = 2  # one SDE step and the Euler step

    def draws_per_token(self, steps: int) -> int:
        return steps  # the start noise and one per SDE step; the Euler step draws none

    def time_grid(self, steps: int, shift: float) -> torch.Tensor:
        return shift_time(torch.linspace(0, 1 - LAST_STEP, steps), shift)  # no end point: the last step is fixed

    def constants(self, grid: torch.Tensor, steps: int) -> list:
        return [sde_scalars(grid[i], grid[i + 1] - grid[i]) for i in range(steps - 1)]

    def sample(self, velocity, z, constants):
        x = sde_steps(velocity, z, constants)
        return x + velocity(x, len(constants)) * LAST_STEP

    def coefficients(self, grid: torch.Tensor, steps: int):
        a, b, c = sde_coefficients(grid[:steps - 1], grid[1:steps] - grid[:steps - 1])
        last = torch.full((1,), LAST_STEP, dtype=grid.dtype, device=grid.device)
        return a + [None], torch.cat([b, last]), c + [None]
