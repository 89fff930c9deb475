"""NextStep-1.1's head: N SDE steps on a grid that ends exactly at t = 1."""
from __future__ import annotations

import torch

from .base import Sampler
from .flow import grid_to_one, sde_coefficients, sde_scalars, sde_steps


class NextStep11(Sampler):
    name = "nextstep1.1"
    description = "SDE steps ending at t=1"
    default_for = ("nextstep1.1", "nextstep1.1-pretrain")

    def draws_per_token(self, steps: int) -> int:
        return steps + 1  # the start noise and one per SDE step

    def time_grid(self, steps: int, shift: float) -> torch.Tensor:
        return grid_to_one(steps, shift)

    def constants(self, grid: torch.Tensor, steps: int) -> list:
        dts = grid[1:] - grid[:-1]
        return [sde_scalars(grid[i], dts[i]) for i in range(steps)]

    def sample(self, velocity, z, constants):
        return sde_steps(velocity, z, constants)

    def coefficients(self, grid: torch.Tensor, steps: int):
        return sde_coefficients(grid[:steps], grid[1:] - grid[:-1])
