"""The only place that touches ComfyUI (`folder_paths`, `comfy.*`).

Every import here is lazy and optional, so the pack, its engine and its tests import on a
machine without ComfyUI; there the nodes still run, without memory management, progress bar
or Cancel (nothing would drive them).
"""
from __future__ import annotations

import importlib
import os

import torch

MODEL_FOLDER = "nextstep"


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def folder_paths():
    return _module("folder_paths")


def model_management():
    return _module("comfy.model_management")


def model_patcher_base():
    """ComfyUI's ModelPatcher class, or None outside ComfyUI."""
    return getattr(_module("comfy.model_patcher"), "ModelPatcher", None)


def quant_ops():
    """comfy.quant_ops (its layout registry and QUANT_ALGOS), or None outside ComfyUI."""
    return _module("comfy.quant_ops")


def in_comfyui() -> bool:
    return model_management() is not None


def register_model_folder() -> None:
    """models/nextstep, put first; a `nextstep:` entry in extra_model_paths.yaml (read before
    packs load) keeps its own paths after it. Listing every file (empty extension set) is
    deliberate: a model is a folder of config, tokenizer and weight files."""
    fp = folder_paths()
    if fp is None:
        return
    fp.add_model_folder_path(MODEL_FOLDER, os.path.join(fp.models_dir, MODEL_FOLDER), is_default=True)


def model_roots() -> list[str]:
    fp = folder_paths()
    if fp is None:
        return []
    try:
        return [p for p in fp.get_folder_paths(MODEL_FOLDER)]
    except KeyError:
        return []


def vae_files() -> list[tuple[str, str]]:
    """(name, full path) of the single files in ComfyUI's own `vae` folder."""
    fp = folder_paths()
    if fp is None:
        return []
    try:
        names = fp.get_filename_list("vae")
    except KeyError:
        return []
    out = []
    for name in names:
        if name.lower().endswith((".safetensors", ".pt", ".pth")):
            path = fp.get_full_path("vae", name)
            if path:
                out.append((name, path))
    return out


def devices(choice: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for a loader's `device` widget. Under ComfyUI, "auto" is the
    device ComfyUI computes on, with weights parked where it parks diffusion models."""
    from ..nextstep_core.devices import resolve_device
    if choice == "cpu":
        cpu = torch.device("cpu")
        return cpu, cpu
    mm = model_management()
    if mm is None:
        dev = resolve_device("auto")
        return dev, dev
    return torch.device(mm.get_torch_device()), torch.device(mm.unet_offload_device())


class PartHolder(torch.nn.Module):
    """What ComfyUI's ModelPatcher manages. The patcher writes bookkeeping attributes (`device`,
    `model_lowvram`, ...) onto the module it holds; the engine's modules expose `device` as a
    read-only property, so they sit one level down, next to the placer that moves them."""

    def __init__(self, part: torch.nn.Module, offload_device: torch.device, placer):
        super().__init__()
        self.part = part
        self.device = offload_device
        self.placer = placer


def manage(part: torch.nn.Module, load_device: torch.device, offload_device: torch.device, placer=None):
    """-> a ModelPatcher for `part` (moved by `placer`, default: whole), or None outside ComfyUI."""
    from .patcher import WholePlacer, patcher_class
    cls = patcher_class()
    if cls is None:
        return None
    placer = placer or WholePlacer(part, load_device, offload_device)
    return cls(_holder_class(part)(part, offload_device, placer), load_device=load_device,
               offload_device=offload_device)


_HOLDERS: dict = {}


def _holder_class(part: torch.nn.Module) -> type:
    """A PartHolder named for the part: ComfyUI logs "Requested to load <class name>" at every load,
    and "NextStepBackbone" tells a user what is loading where "PartHolder" does not."""
    name = "NextStep" + type(part).__name__.replace("NextStep", "")
    if name not in _HOLDERS:
        _HOLDERS[name] = type(name, (PartHolder,), {"__doc__": PartHolder.__doc__})
    return _HOLDERS[name]


def load_to_device(patchers: list, memory_required: int) -> None:
    """One request to ComfyUI: make room (offloading other models, keeping `memory_required` free
    for the run) and load our parts, each as its placer decides."""
    patchers = [p for p in patchers if p is not None]
    mm = model_management()
    if mm is None or not patchers:
        return
    mm.load_models_gpu(patchers, memory_required=int(memory_required))
    for p in patchers:
        where = next(p.model.part.parameters()).device
        if not same_device(where, torch.device(p.load_device)):
            from ..nextstep_core.errors import DeviceError
            raise DeviceError(
                f"ComfyUI left a NextStep part on {where} instead of {p.load_device}: free the GPU of other "
                "models, or set the three NextStep loaders' device to cpu.")


def same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def interrupt_check():
    """-> a function that raises ComfyUI's interrupt exception once the user pressed Cancel (looked
    up once per run: it is called after every image token)."""
    mm = model_management()
    return mm.throw_exception_if_processing_interrupted if mm is not None else (lambda: None)


def progress_bar(total: int, node_id=None):
    utils = _module("comfy.utils")
    if utils is None:
        return None
    return utils.ProgressBar(total, node_id=node_id)


def preview_size() -> int:
    args = getattr(_module("comfy.cli_args"), "args", None)
    return int(getattr(args, "preview_size", 512) or 512)


def progress_text(text: str, node_id=None) -> None:
    """A status line on the node (ComfyUI's PromptServer.send_progress_text), for waits that have
    no progress of their own; nothing outside ComfyUI or in versions without it."""
    if node_id is None or not in_comfyui():
        return
    instance = getattr(getattr(_module("server"), "PromptServer", None), "instance", None)
    send = getattr(instance, "send_progress_text", None)
    if send is not None:
        send(text, node_id)


def streams_weights(device: torch.device) -> bool:
    """Whether streaming layers can help: onto a CUDA GPU only (a CPU run holds the weights in RAM
    already, and Apple's unified memory is that same RAM)."""
    return model_management() is not None and device.type == "cuda"


def room(device: torch.device, run_bytes: int) -> int:
    """-> bytes our placed weights may hold on `device` plus `run_bytes`: what ComfyUI reports free,
    less what it keeps free at every load (its inference minimum or the run's needs, whichever is
    larger, plus --reserve-vram). Leaving that much means ComfyUI's next load request, ours included,
    finds its room without unloading the backbone it has just placed."""
    mm = model_management()
    keep = max(int(mm.minimum_inference_memory()), int(run_bytes) + int(mm.extra_reserved_memory()))
    return int(mm.get_free_memory(device)) - keep + int(run_bytes)


def show(text: str, node_id=None) -> None:
    """What runs where: in the log, and on the node (ComfyUI's progress text) where it has one."""
    import logging
    logging.info("NextStep: %s", text)
    instance = getattr(getattr(_module("server"), "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id)
