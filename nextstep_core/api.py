"""The engine's face: everything a host (the ComfyUI nodes) uses, named once.

A host loads the three parts, describes a run as a `Request` (or a story as `StorySettings`),
asks what it will hold (`NextStepPipeline.shape`, `run_bytes`) so its own memory manager can
make room, then runs it. The vocabulary for that (settings, their ranges, the model cards,
errors) comes from here too, so the modules behind this face can be split, merged or renamed
without touching a host; `tests/test_import_graph.py` keeps nodes/ to this one module.
"""
from __future__ import annotations

# load the parts
from .checkpoint import attach_lm_head, load_backbone, load_flow_head, load_vae, model_variant
from .devices import resolve_device, resolve_dtype
from .variants import EDIT_VARIANT, FALLBACK, TABLE as VARIANTS, by_folder
from .presets import preset
from .weights.int4 import GROUP as INT4_GROUP, dequantize as int4_dequantize, quantize_int4, stored_linear

# describe a run: its settings, checked once against the ranges they are made with
from .engine import SamplingSettings
from .reasoning import ReasoningSettings
from .pipeline import Request, Result, RunShape, NextStepPipeline
from .story import MODES as STORY_MODES, StoryContext, StorySettings, Storyboard
from .limits import CFG, CFG_IMG, MAX_SEED, MAX_SIZE, PIXELS_PER_TOKEN, SHIFT, STEPS, Range
from .samplers import CFG_SCHEDULES, get_sampler, sampler_names
from .images import FIT_MODES, bucket_sizes, from_hwc_float

# plan it, and show it while it runs
from .memory import run_bytes
from .preview import partial_image

# or hand it to a vLLM-Omni server
from .remote import API_KEY_ENV, DEFAULT_TIMEOUT, HOSTS_ENV, START_HINT, Server, draw, parse_servers

from .errors import CheckpointError, InputImageError, NextStepError, SettingsError

__all__ = [
    "attach_lm_head", "load_backbone", "load_flow_head", "load_vae", "model_variant", "resolve_device",
    "resolve_dtype", "EDIT_VARIANT", "FALLBACK", "VARIANTS", "by_folder", "preset", "INT4_GROUP",
    "int4_dequantize", "quantize_int4", "stored_linear",
    "SamplingSettings", "ReasoningSettings", "Request", "Result", "RunShape", "NextStepPipeline", "STORY_MODES",
    "StoryContext", "StorySettings", "Storyboard", "CFG", "CFG_IMG", "MAX_SEED", "MAX_SIZE", "PIXELS_PER_TOKEN",
    "SHIFT", "STEPS", "Range", "CFG_SCHEDULES", "get_sampler", "sampler_names", "FIT_MODES", "bucket_sizes",
    "from_hwc_float",
    "run_bytes", "partial_image",
    "API_KEY_ENV", "DEFAULT_TIMEOUT", "HOSTS_ENV", "START_HINT", "Server", "draw", "parse_servers",
    "CheckpointError", "InputImageError", "NextStepError", "SettingsError",
]
