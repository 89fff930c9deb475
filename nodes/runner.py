"""Running one engine request from a node: check the three parts belong together, let ComfyUI
make room and move them to the GPU, then sample with progress, Cancel and previews."""
from __future__ import annotations

from . import bridge, core_memory
from .progress import TokenProgress
from .remote import LOCAL_ONLY, is_remote
from .sockets import BACKBONE, FLOW_HEAD, VAE, LoadedPart, label
from ..nextstep_core.checkpoint import attach_lm_head
from ..nextstep_core.errors import SettingsError
from ..nextstep_core.pipeline import NextStepPipeline, Request, Result
from ..nextstep_core.prompts import cfg_mult_for

PROMPT_TOKENS = 512  # a generous prompt length for the memory estimate


def pipeline_for(backbone, flow_head, vae) -> NextStepPipeline:
    """The engine on the three inputs. Raises SettingsError (naming the loader to connect) unless
    they are a backbone, a flow head and a VAE set to the same device that fit together (the
    pipeline checks that)."""
    if is_remote(backbone, flow_head, vae):
        raise SettingsError(LOCAL_ONLY)
    for value, kind, node in ((backbone, BACKBONE, "NextStep Backbone Loader"),
                              (flow_head, FLOW_HEAD, "NextStep Flow Head Loader"),
                              (vae, VAE, "NextStep VAE Loader")):
        if not isinstance(value, LoadedPart) or value.kind != kind:
            raise SettingsError(f"The {label(kind)} input got {value!r}; "
                                f"connect a {node}.")
    devices = {p.kind: p.load_device for p in (backbone, flow_head, vae)}
    if len({(d.type, d.index) for d in devices.values()}) > 1:
        listed = ", ".join(f"{label(k)} on {d}" for k, d in devices.items())
        raise SettingsError(f"The three NextStep parts are set to different devices ({listed}): set the same "
                            "device on all three loaders.")
    return NextStepPipeline(backbone.module, backbone.tokenizer, flow_head.module, vae.module)


def run(backbone: LoadedPart, flow_head: LoadedPart, vae: LoadedPart, request: Request, *, width: int,
        height: int, node_id=None) -> Result:
    """`width`/`height`: the output size, known before the run (edits: the fitted input size,
    which is also the size of the image tokens in the prompt)."""
    pipeline = pipeline_for(backbone, flow_head, vae)
    bb = backbone.module
    grid = pipeline.grid(width, height)
    s = request.sampling
    batch = len(request.edit_images or request.prompts) * request.images_per_prompt
    editing = request.edit_images is not None
    rows = batch * cfg_mult_for(s.cfg, s.cfg_img, editing)
    tokens = grid[0] * grid[1]
    think = request.reasoning
    writes_text = think.mode != "off" and think.text is None
    if writes_text and bb.lm_head is None:
        attach_lm_head(bb)  # read now (in RAM, built from core's layers), so core pages it with the rest
        core_memory.refresh_size(backbone.patcher)
    extra = (tokens if editing else 0) + (think.max_tokens if writes_text else 0)
    load_parts(backbone, flow_head, vae, rows, batch, tokens, PROMPT_TOKENS + extra, node_id)
    return pipeline.run(request, callback=TokenProgress(vae.module, bb, grid, node_id))


def load_parts(backbone: LoadedPart, flow_head: LoadedPart, vae: LoadedPart, rows: int, batch: int, tokens: int,
               context: int, node_id=None) -> None:
    """Asks ComfyUI for the three parts for one run: `rows` CFG rows of `batch` images, `tokens` image
    tokens each after `context` positions (prompt, edit image, reasoning, story so far)."""
    need = core_memory.run_memory(backbone.module, vae.module, rows, batch, tokens, context)
    core_memory.load_for_run([backbone.patcher, flow_head.patcher, vae.patcher], need, backbone.patcher)
    if backbone.patcher is not None:
        bridge.show(core_memory.describe(backbone.patcher, len(backbone.module.layers)), node_id)
