"""Deterministic Euler on the NextStep-1.1 grid: noise only at the start. Not an official
setting: it shows what the SDE's fresh noise adds."""
from __future__ import annotations

import torch

from .base import Sampler
from .flow import grid_to_one


class Ode(Sampler):
    name = "ode"
    description = "deterministic Euler, noise only at the start (not an official setting)"

    def draws_per_token(self, steps: int) -> int:
        return 1

    def time_grid(self, steps: int, shift: float) -> torch.Tensor:
        return grid_to_one(steps, shift)

    def constants(self, grid: torch.Tensor, steps: int) -> torch.Tensor:
        return grid[1:] - grid[:-1]

    def sample(self, velocity, z, dts):
        x = z[0]
        for i in range(dts.shape[0]):
            x = x + velocity(x, i) * dts[i]
        return x

    def coefficients(self, grid: torch.Tensor, steps: int):
        return [None] * steps, grid[1:] - grid[:-1], [None] * steps
