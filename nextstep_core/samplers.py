"""Flow-matching samplers for one image token, CFG combination and CFG schedules.

Conventions of every official head: x_t = t * data + (1 - t) * noise, t = 0 is noise, the net
predicts v = data - noise. The schedules below are written to reproduce each official release
operation for operation (the rounding of `(1-t)^2 + t(1-t)` vs `1-t` matters for bit parity).
"""
from __future__ import annotations

import math
import torch

from .errors import SettingsError


SAMPLERS = {
    "nextstep1": "NextStep-1 (Aug 2025 release): N-1 SDE steps on linspace(0, 0.96), then one 0.04 Euler step",
    "nextstep1.1": "NextStep-1.1 head: N SDE steps on a grid that ends exactly at t = 1",
    "ode": "Deterministic Euler on the NextStep-1.1 grid: noise only at the start (not an official default)",
}


def draws_per_token(sampler: str, steps: int) -> int:
    """Noise draws per image token, in the order the official heads make them: the start noise,
    then one per SDE step."""
    return {"nextstep1": steps, "nextstep1.1": steps + 1, "ode": 1}[sampler]


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t / (s - (s - 1) t): s > 1 spends more of the steps near noise."""
    return t / (shift - (shift - 1) * t)


def time_grid(sampler: str, steps: int, shift: float) -> torch.Tensor:
    """float32 times the network is evaluated at, plus the end point: [steps + 1] for the 1.1-style
    grids; for `nextstep1` the N evaluation times (the final 0.04 step has no end point)."""
    if sampler == "nextstep1":
        return shift_time(torch.linspace(0, 1 - 0.04, steps), shift)
    t = shift_time(torch.linspace(0, 1, steps + 1)[:-1], shift)
    return torch.cat([t, torch.ones(1)])


def check_sampler(sampler: str, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise SettingsError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if steps < 1 or (sampler == "nextstep1" and steps < 2):
        least = 2 if sampler == "nextstep1" else 1
        raise SettingsError(f"steps={steps} is too few for sampler {sampler!r}: use at least {least} "
                            "(the model cards use 28-50).")


def combine_cfg(v: torch.Tensor, cfg_mult: int, cfg, cfg_img) -> torch.Tensor:
    """[cfg_mult * B, D] velocities -> guided [B, D]. Rows are [cond][uncond] for text CFG and
    [image+text][image+negative][negative] for edit, as in the official pipeline."""
    if cfg_mult == 1:
        return v
    if cfg_mult == 2:
        cond, uncond = v.chunk(2, dim=0)
        return uncond + cfg * (cond - uncond)
    cond, uncond_img, uncond = v.chunk(3, dim=0)
    return uncond + cfg_img * (uncond_img - uncond) + cfg * (cond - uncond_img)


def sde_step(x, v, t, dt, w):
    """Euler-Maruyama step of the SiT 'sigma' SDE with alpha = t, sigma = 1 - t, in the reference's
    operation order. t, dt: 0-d float32 tensors; w: standard normal like x."""
    var = (1 - t) ** 2 - t * -1 * (1 - t)
    score = (t * v - x) / var
    drift = v + (1 - t) * score
    mean_x = x + drift * dt
    return mean_x + torch.sqrt(2 * (1 - t)) * (w * torch.sqrt(dt))


def sde_scalars(t, dt):
    """The step-invariant part of `sde_step` (0-d tensors), with the same operations."""
    one_minus_t = 1 - t
    var = (1 - t) ** 2 - t * -1 * (1 - t)
    return t, dt, var, one_minus_t, torch.sqrt(2 * (1 - t)), torch.sqrt(dt)


def sde_step_from(x, v, scalars, w):
    """`sde_step` with its scalars from `sde_scalars`: bit-equal, four fewer ops per call."""
    t, dt, var, one_minus_t, noise_scale, sqrt_dt = scalars
    score = (t * v - x) / var
    drift = v + one_minus_t * score
    mean_x = x + drift * dt
    return mean_x + noise_scale * (w * sqrt_dt)


def step_coefficients(sampler: str, steps: int, t: torch.Tensor, dts, last_step: float):
    """Per step (A, B, C) with x_next = A x + B v + C w for the fast sampler: the SDE step
    x + ((1+t) v - x) dt + sqrt(2 (1-t) dt) w (its variance (1-t)^2 + t(1-t) is 1 - t), or
    an Euler step (A = 1 and C = 0 are given as None: no multiply). Returns (A list, B [steps]
    tensor, C list)."""
    a, b, c = [], [], []
    if sampler == "nextstep1":
        dt = t[1:steps] - t[:steps - 1]
        tt = t[:steps - 1]
    elif sampler == "nextstep1.1":
        dt, tt = dts, t[:steps]
    else:
        dt, tt = dts, None
    if tt is not None:
        a_all, b_all, c_all = 1 - dt, (1 + tt) * dt, torch.sqrt(2 * (1 - tt) * dt)
        a, c = list(a_all.unbind(0)), list(c_all.unbind(0))
        bs = [b_all]
    else:
        bs = [dt]
        a, c = [None] * steps, [None] * steps
    if sampler == "nextstep1":
        bs.append(torch.full((1,), last_step, dtype=t.dtype, device=t.device))
        a.append(None)
        c.append(None)
    return a, torch.cat(bs), c


def cfg_weights(scale: torch.Tensor, cfg_mult: int) -> torch.Tensor:
    """[cfg_mult] weights w with sum_j w_j v_j == combine_cfg(v): (cfg, 1 - cfg) for text CFG,
    (cfg, cfg_img - cfg, 1 - cfg_img) for edit rows [cond][image][uncond]."""
    if cfg_mult == 1:
        return torch.ones(1, dtype=scale.dtype, device=scale.device)
    if cfg_mult == 2:
        return torch.stack([scale[0], 1 - scale[0]])
    return torch.stack([scale[0], scale[1] - scale[0], 1 - scale[1]])


def cfg_values(schedule: str, cfg: float, cfg_img: float, n_tokens: int) -> torch.Tensor:
    """[n_tokens, 2] float64 (cfg, cfg_img) per token. Two official 'linear' schedules exist and
    disagree, so each is named after its release:
    - linear (Aug 2025 / NextStep-1.1 HF code): 1 + (cfg - 1) (n - k) / n, from cfg down to ~1;
    - linear-ramp (Feb 2026 training repo): max(cfg / 2, 1 + (cfg - 1) k / n), rising to cfg."""
    k = torch.arange(n_tokens, dtype=torch.float64)
    out = torch.empty(n_tokens, 2, dtype=torch.float64)
    for j, val in enumerate((cfg, cfg_img)):
        if schedule == "constant":
            out[:, j] = val
        elif schedule == "linear":
            out[:, j] = 1 + (val - 1) * (n_tokens - k) / n_tokens
        elif schedule == "linear-ramp":
            out[:, j] = torch.clamp(1 + (val - 1) * k / n_tokens, min=val / 2)
        else:
            raise SettingsError(f"Unknown cfg schedule {schedule!r}; choose constant, linear or linear-ramp.")
    return out


def check_guidance(cfg: float, cfg_img: float) -> None:
    for name, val in (("cfg", cfg), ("cfg_img", cfg_img)):
        if not math.isfinite(val):
            raise SettingsError(f"{name}={val} is not a finite number. Guidance scales start at 1.0 (= guidance "
                                "off); the model cards use cfg 7.5 and, for editing, cfg_img 2.0.")
        if val < 1.0:
            raise SettingsError(
                f"{name}={val} is below 1. Guidance scales start at 1.0 (= guidance off); the model cards "
                "use cfg 7.5 and, for editing, cfg_img 2.0.")
