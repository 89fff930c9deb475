"""Flow-matching maths the samplers share: the time shift, the grid that ends at t = 1, and the
SDE step in the reference's operation order and in the folded form of the fast path.

Conventions of every official head: x_t = t * data + (1 - t) * noise, t = 0 is noise, the net
predicts v = data - noise. The steps are written to reproduce each official release operation
for operation (the rounding of `(1-t)^2 + t(1-t)` vs `1-t` matters for bit parity).
"""
from __future__ import annotations

import torch


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t / (s - (s - 1) t): s > 1 spends more of the steps near noise."""
    return t / (shift - (shift - 1) * t)


def grid_to_one(steps: int, shift: float) -> torch.Tensor:
    """[steps + 1] float32: the NextStep-1.1 head's evaluation times, then the end point t = 1."""
    t = shift_time(torch.linspace(0, 1, steps + 1)[:-1], shift)
    return torch.cat([t, torch.ones(1)])


def sde_scalars(t, dt):
    """The step-invariant part of the SDE step (0-d tensors), in the reference's operations."""
    one_minus_t = 1 - t
    var = (1 - t) ** 2 - t * -1 * (1 - t)
    return t, dt, var, one_minus_t, torch.sqrt(2 * (1 - t)), torch.sqrt(dt)


def sde_step_from(x, v, scalars, w):
    """Euler-Maruyama step of the SiT 'sigma' SDE with alpha = t, sigma = 1 - t, in the reference's
    operation order, its scalars made once by `sde_scalars`. w: standard normal like x."""
    t, dt, var, one_minus_t, noise_scale, sqrt_dt = scalars
    score = (t * v - x) / var
    drift = v + one_minus_t * score
    mean_x = x + drift * dt
    return mean_x + noise_scale * (w * sqrt_dt)


def sde_step(x, v, t, dt, w):
    """One step at time t, step dt (0-d float32 tensors), scalars and all (references, tests)."""
    return sde_step_from(x, v, sde_scalars(t, dt), w)


def sde_steps(velocity, z, scalars: list) -> torch.Tensor:
    """x from the start noise z[0] through one `sde_step_from` per entry of `scalars`, the i-th
    drawing z[i + 1]."""
    x = z[0]
    for i, sc in enumerate(scalars):
        x = sde_step_from(x, velocity(x, i), sc, z[i + 1])
    return x


def sde_coefficients(t: torch.Tensor, dt: torch.Tensor):
    """The SDE step x + ((1+t) v - x) dt + sqrt(2 (1-t) dt) w as x_next = A x + B v + C w (its
    variance (1-t)^2 + t(1-t) is 1 - t on paper), for times t and steps dt [n]: (A list of 0-d
    tensors, B [n], C list of 0-d tensors)."""
    a, b, c = 1 - dt, (1 + t) * dt, torch.sqrt(2 * (1 - t) * dt)
    return list(a.unbind(0)), b, list(c.unbind(0))
