"""Classifier-free guidance: combining the CFG rows' velocities, and the schedules of the scales
over the image tokens (one table: the widgets, the CLI and `cfg_values` all read CFG_SCHEDULES)."""
from __future__ import annotations

import torch

from ..errors import SettingsError


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


def cfg_weights(scale: torch.Tensor, cfg_mult: int) -> torch.Tensor:
    """[cfg_mult] weights w with sum_j w_j v_j == combine_cfg(v): (cfg, 1 - cfg) for text CFG,
    (cfg, cfg_img - cfg, 1 - cfg_img) for edit rows [cond][image][uncond]."""
    if cfg_mult == 1:
        return torch.ones(1, dtype=scale.dtype, device=scale.device)
    if cfg_mult == 2:
        return torch.stack([scale[0], 1 - scale[0]])
    return torch.stack([scale[0], scale[1] - scale[0], 1 - scale[1]])


# Two official 'linear' schedules exist and disagree, so each is named after its release. Each
# maps (scale, token index k as float64 [n], n) to the scale per token; the docstring is the tooltip.

def _constant(val: float, k: torch.Tensor, n: int) -> torch.Tensor:
    """the official default."""
    return torch.full_like(k, val)


def _linear(val: float, k: torch.Tensor, n: int) -> torch.Tensor:
    """starts at cfg and falls to 1 by the last token (Aug 2025 / NextStep-1.1 code)."""
    return 1 + (val - 1) * (n - k) / n


def _linear_ramp(val: float, k: torch.Tensor, n: int) -> torch.Tensor:
    """starts at cfg/2 and rises to cfg (Feb 2026 training repo)."""
    return torch.clamp(1 + (val - 1) * k / n, min=val / 2)


CFG_SCHEDULES = {"constant": _constant, "linear": _linear, "linear-ramp": _linear_ramp}


def check_schedule(schedule: str) -> None:
    if schedule not in CFG_SCHEDULES:
        raise SettingsError(f"cfg_schedule={schedule!r} is not a CFG schedule; choose one of "
                            f"{', '.join(CFG_SCHEDULES)}.")


def cfg_values(schedule: str, cfg: float, cfg_img: float, n_tokens: int) -> torch.Tensor:
    """[n_tokens, 2] float64 (cfg, cfg_img) per token; the settings checked the schedule's name."""
    rule = CFG_SCHEDULES[schedule]
    k = torch.arange(n_tokens, dtype=torch.float64)
    out = torch.empty(n_tokens, 2, dtype=torch.float64)
    for j, val in enumerate((cfg, cfg_img)):
        out[:, j] = rule(val, k, n_tokens)
    return out
