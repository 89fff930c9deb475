"""What the engine asks of a sampler. Each sampler is one module in this package holding one
subclass (see registry.py): the engine never branches on a sampler's name.

A sampler turns one image token's start noise into the token, evaluating the flow head's
velocity at its own times. It gives the engine its step in two forms: `sample`, with the
reference's operations (bit parity with StepFun's pipeline, `exact`), and `coefficients`, the
same step folded into x_next = A x + B v + C w, which the fast path runs with the guidance folded
in too (folded.py: one multiply-add and one small mixing product per step, capturable).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import SettingsError

Velocity = Callable[[torch.Tensor, int], torch.Tensor]  # (x, evaluation index) -> guided float32 velocity


class Sampler:
    name: str = ""  # the widget and --sampler value; a class without one is a base, never offered
    description: str = ""  # one line for the sampler widget's tooltip
    default_for: tuple = ()  # model variants (presets.PRESETS keys) whose card samples with it ('auto')
    min_steps: int = 1

    def draws_per_token(self, steps: int) -> int:
        """Standard-normal draws per image token, in the order `sample` reads them (the official
        heads draw the start noise, then one per SDE step): the seed's stream depends on it."""
        raise NotImplementedError

    def time_grid(self, steps: int, shift: float) -> torch.Tensor:
        """float32 times on the CPU: the first `steps` are where the head is evaluated (their
        embeddings are made once per image); a sampler may append its end point."""
        raise NotImplementedError

    def constants(self, grid: torch.Tensor, steps: int):
        """What `sample` needs that depends only on the grid (on the run's device), made once per
        image rather than once per token."""
        return None

    def sample(self, velocity: Velocity, z: torch.Tensor, constants) -> torch.Tensor:
        """One token from its noise z [draws, rows, D] with the reference's operations."""
        raise NotImplementedError

    def coefficients(self, grid: torch.Tensor, steps: int) -> tuple[list, torch.Tensor, list]:
        """Per evaluation i: x <- A[i] x + B[i] v_i + C[i] z[i + 1]. Returns (A list, B [steps]
        tensor, C list); None for A = 1 or C = 0 (no multiply)."""
        raise NotImplementedError

    def check_steps(self, steps: int) -> None:
        if steps < self.min_steps:
            raise SettingsError(f"steps={steps} is too few for sampler {self.name!r}: use at least {self.min_steps} "
                                "(the model cards use 28-50).")
