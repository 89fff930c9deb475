"""Running one engine request from a node: check the three parts belong together, let ComfyUI
make room and move them to the GPU, then sample with progress, Cancel and previews."""
from __future__ import annotations

from . import bridge, core_memory
from .progress import TokenProgress
from .remote import LOCAL_ONLY, is_remote
from .sockets import BACKBONE, FLOW_HEAD, VAE, LoadedPart, label
from ..nextstep_core.api import NextStepPipeline, Request, Result, RunShape, SettingsError, attach_lm_head, run_bytes


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


def run(backbone: LoadedPart, flow_head: LoadedPart, vae: LoadedPart, request: Request, node_id=None) -> Result:
    pipeline = pipeline_for(backbone, flow_head, vae)
    shape = pipeline.shape(request)
    bb = backbone.module
    if shape.writes_text and bb.lm_head is None:
        attach_lm_head(bb)  # read now (in RAM, built from core's layers), so core pages it with the rest
        core_memory.refresh_size(backbone.patcher)
    load_parts(backbone, flow_head, vae, shape, node_id)
    return pipeline.run(request, callback=TokenProgress(vae.module, bb, shape.grid, node_id))


def load_parts(backbone: LoadedPart, flow_head: LoadedPart, vae: LoadedPart, shape: RunShape, node_id=None) -> None:
    """Asks ComfyUI for the three parts for one run of this shape (the engine's, see RunShape)."""
    need = run_bytes(backbone.module, vae.module, shape)
    core_memory.load_for_run([backbone.patcher, flow_head.patcher, vae.patcher], need, backbone.patcher)
    if backbone.patcher is not None:
        bridge.show(core_memory.describe(backbone.patcher, len(backbone.module.layers)), node_id)
