"""Widgets the two generate nodes share, and how their values become engine settings.

Defaults are the model cards' recommended settings, so a node dropped on the canvas makes the
image the card shows; widget names and order are fixed (saved workflows store values by
position, and the web extension finds widgets by name).
"""
from __future__ import annotations

from ..nextstep_core.api import (CFG, CFG_SCHEDULES, MAX_SEED, MAX_SIZE, PIXELS_PER_TOKEN, SHIFT, STEPS, Range,
                                 SamplingSettings, bucket_sizes, get_sampler, preset, sampler_names)
from .sockets import BACKBONE, FLOW_HEAD, VAE

CATEGORY = "NextStep"


def bucket_list(base: int = 512) -> str:
    return ", ".join(f"{w}x{h}" for h, w in bucket_sizes(base))


def model_inputs() -> dict:
    return {
        "backbone": (BACKBONE, {"tooltip": "From NextStep Backbone Loader."}),
        "flow_head": (FLOW_HEAD, {"tooltip": "From NextStep Flow Head Loader (same model folder as the backbone)."}),
        "vae": (VAE, {"tooltip": "From NextStep VAE Loader."}),
    }


def prompt_input(tooltip: str, default: str = "", multiline: bool = True):
    return ("STRING", {"default": default, "multiline": multiline, "tooltip": tooltip})


def size_input(default: int, tooltip: str):
    return ("INT", {"default": default, "min": PIXELS_PER_TOKEN, "max": MAX_SIZE, "step": PIXELS_PER_TOKEN,
                    "tooltip": tooltip})


def float_input(rule: Range, default: float, tooltip: str):
    """A FLOAT widget whose min, max and step are the engine's (limits.py)."""
    return ("FLOAT", {"default": default, "min": rule.lo, "max": rule.hi, "step": rule.step, "round": 0.01,
                      "tooltip": tooltip})


def cfg_input(default: float, tooltip: str, rule: Range = CFG):
    return float_input(rule, default, tooltip)


def sampler_choices() -> list[str]:
    """Read when ComfyUI asks for INPUT_TYPES, so every sampler module of the engine is offered."""
    return ["auto"] + sampler_names()


def sampler_tooltip() -> str:
    samplers = [get_sampler(name) for name in sampler_names()]
    own = "; ".join(f"{s.name} for {', '.join(s.default_for)}" for s in samplers if s.default_for)
    return " ".join([f"auto: the loaded model's own sampler ({own})."] +
                    [f"{s.name}: {s.description}." for s in samplers])


def cfg_schedule_tooltip() -> str:
    return " ".join(["How guidance changes over the image tokens."] +
                    [f"{name}: {rule.__doc__}" for name, rule in CFG_SCHEDULES.items()])


def sampling_inputs(steps: int, shift: float, use_norm: bool) -> dict:
    """steps .. cfg_schedule, in widget order."""
    return {
        "steps": ("INT", {"default": steps, "min": STEPS.lo, "max": STEPS.hi, "tooltip": (
            "Flow-matching steps per image token (the model cards use 28 for NextStep-1, 30 for 1.1, 50 for edits). "
            "Fewer is faster and rougher.")}),
        "timesteps_shift": float_input(SHIFT, shift, (
            "Time shift of the flow schedule: above 1 spends more steps near noise. 1.0 for text to image, "
            "3.2 for the edit model.")),
        "use_norm": ("BOOLEAN", {"default": use_norm, "tooltip": (
            "LayerNorm each sampled token before it is fed back, as the edit model expects (on for "
            "NextStep-1-Large-Edit, off for the text-to-image models).")}),
        "sampler": (sampler_choices(), {"default": "auto", "tooltip": sampler_tooltip()}),
        "cfg_schedule": (list(CFG_SCHEDULES), {"default": "constant", "tooltip": cfg_schedule_tooltip()}),
    }


def seed_input(default: int):
    return ("INT", {"default": default, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": (
        "Seed of the sampling noise (drawn on the CPU, so a seed gives the same image on any GPU).")})


def resolve_sampler(sampler: str, backbone) -> str:
    if sampler != "auto":
        return sampler
    return preset(getattr(backbone, "variant", None) or "")["sampler"]


def sampling(backbone, *, cfg: float, cfg_img: float, cfg_schedule: str, steps: int, timesteps_shift: float,
             use_norm: bool, sampler: str) -> SamplingSettings:
    # the settings check themselves against the engine's table (ranges, sampler and schedule names): a
    # value that is no number is passed on as it is, so its message is the engine's too
    return SamplingSettings(cfg=number(cfg), cfg_img=number(cfg_img), cfg_schedule=cfg_schedule,
                            steps=number(steps, int), shift=number(timesteps_shift), use_norm=bool(use_norm),
                            sampler=resolve_sampler(sampler, backbone))


def number(value, kind=float):
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        return value
