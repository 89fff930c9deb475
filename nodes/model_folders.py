"""What the loader dropdowns offer: the Hugging Face-format folders under models/nextstep (and
any `nextstep:` paths from extra_model_paths.yaml), the `vae/` inside each, and single files in
ComfyUI's own `vae` folder.

Names are paths relative to their root, so a workflow saved on one machine finds the same model
on another that downloaded it to the same place.
"""
from __future__ import annotations

import json
import os

from . import bridge
from ..nextstep_core.api import VARIANTS as TABLE, CheckpointError, by_folder

REPOS = tuple(v.folder for v in TABLE)  # the folder names the released repos download to
VAE_WEIGHTS = ("checkpoint.pt", "diffusion_pytorch_model.safetensors", "model.safetensors")
SCAN_DEPTH = 2  # models/nextstep/<name> and models/nextstep/<org>/<name>


def _config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError):
        return {}


def is_model_folder(path: str) -> bool:
    cfg = _config(path)
    return cfg.get("model_type") == "nextstep" or "image_placeholder_id" in cfg


def is_vae_folder(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    files = os.listdir(path)
    if any(f in files for f in VAE_WEIGHTS):
        return True
    return "z_channels" in _config(path) and any(f.endswith(".safetensors") for f in files)


def _subdirs(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def _scan(root: str):
    """Yields (relative name, path, kind) with kind "model" or "vae"; never looks inside a model."""
    todo = [("", root, 0)]
    while todo:
        rel, path, depth = todo.pop(0)
        for name in _subdirs(path):
            sub, sub_rel = os.path.join(path, name), f"{rel}{name}"
            if is_model_folder(sub):
                yield sub_rel, sub, "model"
            elif is_vae_folder(sub):
                yield sub_rel, sub, "vae"
            elif depth + 1 < SCAN_DEPTH:
                todo.append((sub_rel + "/", sub, depth + 1))


def _entries():
    seen = set()
    for root in bridge.model_roots():
        for rel, path, kind in _scan(root):
            if rel not in seen:  # the first root wins, as in ComfyUI's own folders
                seen.add(rel)
                yield rel, path, kind


def model_folders() -> dict[str, str]:
    return {rel: path for rel, path, kind in _entries() if kind == "model"}


def vae_choices() -> dict[str, str]:
    out = {}
    for rel, path, kind in _entries():
        if kind == "model" and is_vae_folder(os.path.join(path, "vae")):
            out[f"{rel}/vae"] = os.path.join(path, "vae")
        elif kind == "vae":
            out[rel] = path
    for name, path in bridge.vae_files():
        out.setdefault(f"vae/{name}", path)
    return out


def _where() -> str:
    roots = bridge.model_roots()
    return ", ".join(roots) if roots else "models/nextstep (ComfyUI not found, so no model folders are known)"


def _download_hint(name: str) -> str:
    leaf = name.rstrip("/").split("/")[-1]
    variant = by_folder(leaf)
    if variant is None:
        return (f"Download a NextStep repo (e.g. {TABLE[0].repo}) into models/nextstep/<its name>, "
                "then press R in ComfyUI to refresh the list.")
    return (f"Download it with `huggingface-cli download {variant.repo} --local-dir models/nextstep/{variant.folder}`, "
            "then press R in ComfyUI to refresh the list.")


def resolve_model(name: str) -> str:
    folders = model_folders()
    if name in folders:
        return folders[name]
    raise CheckpointError(f"NextStep model folder {name!r} was not found in {_where()}. {_download_hint(name)}")


def resolve_vae(name: str) -> str:
    choices = vae_choices()
    if name in choices:
        return choices[name]
    raise CheckpointError(
        f"NextStep VAE {name!r} was not found (looked for <model>/vae in {_where()} and for files in ComfyUI's "
        f"vae folder). The VAE comes with every NextStep repo as its vae/ folder. {_download_hint(name.split('/')[0])}")


def check(name: str, what: str) -> bool | str:
    """VALIDATE_INPUTS answer: True, or the sentence shown on the red node."""
    try:
        (resolve_vae if what == "vae" else resolve_model)(name)
    except CheckpointError as exc:
        return str(exc)
    return True
