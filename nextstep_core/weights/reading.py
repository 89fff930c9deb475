"""Reading weight files: safetensors (single or sharded with an index), memory-mapped, with
truncation detected up front; and the VAE's `checkpoint.pt` through `weights_only` loading.

Modules are built on the meta device and each tensor is converted and assigned one at a time,
so peak RAM while loading stays near the size of the weights, not double.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"
ALIGN = 64  # bytes; what torch's CPU allocator gives every tensor


def placed(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """`t` on `device` in `dtype`, never at an address that depends on where it sat in its file.
    A tensor read from a memory-mapped file stays inside the mapping when nothing converts it, at
    whatever alignment its file offset gives; CPU matmuls round differently at other alignments, so
    the same weights read from two files (a model folder and a pre-quantized file) gave other tokens.
    Such a tensor is copied to an aligned one; an aligned one is left in the mapping."""
    u = t.to(device=device, dtype=dtype)
    if u.device.type == "cpu" and u.data_ptr() % ALIGN:
        u = u.clone()
    return u


def data_start(path: str) -> int:
    """Byte offset of the tensor data (offsets in the header count from here)."""
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def safetensors_header(path: str) -> dict:
    """Parse the header and check the file holds every byte it promises (a cut download does not)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}). If it is a download, it is "
                              "incomplete or corrupt: download it again.") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: it has {size:,} bytes but its header describes {8 + n + end:,}. "
            "The download stopped early: download this file again.")
    return header


class WeightIndex:
    """Maps every tensor name of a model folder (or of one .safetensors file) to its file, without
    reading tensor data. Pre-quantized files lying in a folder are not part of its weights."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        self.offsets: dict[str, tuple] = {}  # byte range within the file's data section
        index = os.path.join(folder, INDEX)
        single = os.path.isfile(folder)
        if single:
            shards = [os.path.basename(folder)]
            folder = os.path.dirname(folder)
        elif os.path.isfile(index):
            with open(index, "r", encoding="utf-8") as fh:
                weight_map = json.load(fh).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise CheckpointError(
                    f"{folder} is missing {len(missing)} of its {len(shards)} weight shards "
                    f"({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}): finish the download.")
        else:
            shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not shards:
            raise CheckpointError(f"{folder} holds no .safetensors weights.")
        skipped = 0
        for shard in shards:
            path = os.path.join(folder, shard)
            header = safetensors_header(path)
            meta = header.get("__metadata__") or {}
            if not single and ("nextstep_quant" in meta or "_quantization_metadata" in meta):
                skipped += 1  # a pre-quantized file beside the full weights: loaded only when chosen
                continue
            for name, meta in header.items():
                if name != "__metadata__":
                    self.files[name] = path
                    self.shapes[name] = tuple(meta["shape"])
                    self.dtypes[name] = meta["dtype"]
                    self.offsets[name] = tuple(meta["data_offsets"])
        if skipped and not self.files:
            raise CheckpointError(f"{self.folder} holds only pre-quantized weights, no full-precision ones.")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self):
        return self.files.keys()

    def tensor(self, name: str, device="cpu") -> torch.Tensor:
        """One tensor as stored (its file's dtype), read alone."""
        from safetensors import safe_open
        if name not in self.files:
            raise CheckpointError(f"{self.folder} lacks the weight {name!r}: it may be another model's file or an "
                                  "incomplete download.")
        with safe_open(self.files[name], framework="pt", device="cpu") as fh:
            t = fh.get_tensor(name)
            return placed(t, device, t.dtype)

    def load_into(self, module: torch.nn.Module, prefix: str, device, dtype, skip=(), keep_dtype=()) -> None:
        """Assign `prefix + name` for every parameter/buffer `name` of `module` (built on meta)
        except the local names in `skip` (left as they are, for the caller to replace); floating
        tensors are cast to `dtype` except the local names in `keep_dtype` (quantized weights and their
        scales, or matrices about to be quantized from their stored precision)."""
        from safetensors import safe_open
        wanted = {n: prefix + n for n, _ in list(module.named_parameters()) + list(module.named_buffers())
                  if n not in skip}
        missing = [k for k in wanted.values() if k not in self.files]
        if missing:
            raise CheckpointError(
                f"{self.folder} lacks {len(missing)} weights this part needs (e.g. {missing[0]!r}). "
                "It may be another model's folder or an incomplete download.")
        by_file: dict[str, list] = {}
        for local, key in wanted.items():
            by_file.setdefault(self.files[key], []).append((local, key))
        state = {}
        for path, items in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as fh:
                for local, key in items:
                    t = fh.get_tensor(key)
                    cast = t.is_floating_point() and local not in keep_dtype
                    state[local] = placed(t, device, dtype if cast else t.dtype)
                    del t
        check_shapes(module, state, self.folder)
        result = module.load_state_dict(state, strict=not skip, assign=True)
        left = sorted(set(result.missing_keys) - set(skip))
        if left:
            raise CheckpointError(f"{self.folder}: {prefix + left[0]!r} was not loaded.")


def check_shapes(module: torch.nn.Module, state: dict, where: str) -> None:
    expected = {n: tuple(p.shape) for n, p in list(module.named_parameters()) + list(module.named_buffers())}
    for name, t in state.items():
        if name in expected and tuple(t.shape) != expected[name]:
            raise CheckpointError(
                f"{where}: weight {name!r} has shape {tuple(t.shape)} but config.json implies {expected[name]}. "
                "config.json and the weights come from different models: download both from the same repo.")


def load_torch_state(path: str) -> dict:
    """The official `vae/checkpoint.pt` is a pickled state dict: read it with weights_only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read as a PyTorch state dict ({type(exc).__name__}: "
                              f"{exc}). Download it again.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict.")
    return state
