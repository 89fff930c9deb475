"""Flow-matching samplers for one image token, CFG combination and CFG schedules.

One module per sampler (nextstep1.py, nextstep1_1.py, ode.py), each a `Sampler` subclass that
registry.py finds; the maths they share is in flow.py, guidance in guidance.py, and the fast
path's form of any of them (guidance folded in) in folded.py.
"""
from .base import Sampler
from .flow import grid_to_one, sde_coefficients, sde_scalars, sde_step, sde_step_from, sde_steps, shift_time
from .folded import FoldedSteps
from .guidance import CFG_SCHEDULES, cfg_values, cfg_weights, check_schedule, combine_cfg
from .registry import check_sampler, default_sampler, draws_per_token, get_sampler, sampler_names

__all__ = ["CFG_SCHEDULES", "FoldedSteps", "Sampler", "cfg_values", "cfg_weights", "check_sampler", "check_schedule",
           "combine_cfg",
           "default_sampler", "draws_per_token", "get_sampler", "grid_to_one", "sampler_names", "sde_coefficients",
           "sde_scalars", "sde_step", "sde_step_from", "sde_steps", "shift_time"]
