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


def core_patcher_class():
    """The patcher core wraps its own models in: `CoreModelPatcher`, which main.py turns into
    ModelPatcherDynamic when dynamic VRAM is on (read at call time for that reason); None outside
    ComfyUI. Older versions without the alias get ModelPatcher."""
    mp = _module("comfy.model_patcher")
    if mp is None:
        return None
    return getattr(mp, "CoreModelPatcher", None) or getattr(mp, "ModelPatcher", None)


def comfy_ops():
    return _module("comfy.ops")


def comfy_prefetch():
    """Core's per-layer prefetch queue (comfy.model_prefetch), or None where this ComfyUI has none."""
    return _module("comfy.model_prefetch")


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
    from ..nextstep_core.api import resolve_device
    if choice == "cpu":
        cpu = torch.device("cpu")
        return cpu, cpu
    mm = model_management()
    if mm is None:
        dev = resolve_device("auto")
        return dev, dev
    return torch.device(mm.get_torch_device()), torch.device(mm.unet_offload_device())


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


def show(text: str, node_id=None) -> None:
    """What runs where: in the log, and on the node (ComfyUI's progress text) where it has one."""
    import logging
    logging.info("NextStep: %s", text)
    instance = getattr(getattr(_module("server"), "PromptServer", None), "instance", None)
    if instance is not None and node_id is not None and hasattr(instance, "send_progress_text"):
        instance.send_progress_text(text, node_id)
