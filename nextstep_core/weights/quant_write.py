"""Writing a pre-quantized single file (layout: quant_file.py) from a quantized backbone, for
`python -m nextstep_core quantize`.

The file records which released model it was made from (checkpoint.model_variant), so this sits
above loading, while reading such a file (quant_file.py) sits below it. It is written tensor by
tensor (never the whole model as one buffer) next to its destination and renamed into place, so
an interrupted conversion leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import struct

import torch

from ..atomic_write import atomic_file
from ..checkpoint import model_variant
from ..config import read_json
from ..errors import CheckpointError, SettingsError
from .convention import EARLIER_SCALE, META_KEY, SCALE, layer_entry, metadata_entry, stored_from_module
from .quant import QUANTIZED, format_of
from .quant_file import DTYPES, META_CONFIG, META_FORMAT, META_VARIANT, quantized_config
from .reading import WeightIndex, data_start


def save_quantized(backbone, tokenizer_folder: str, out_path: str, *, lm_head: bool = True, force: bool = False) -> str:
    """Write `backbone` (quantized) as one file. `tokenizer_folder` is the model folder it was
    loaded from (or the pre-quantized file, when an earlier file is written again): config.json goes
    into the metadata and every tensor that is not quantized (plus the LM head and the flow head) is
    copied from its files unchanged, whatever dtype the backbone was loaded in."""
    fmt = format_of(backbone)
    if fmt is None:
        raise SettingsError("This backbone is not quantized: load it with a weight format (int8, fp8 or int4) first.")
    if os.path.exists(out_path) and not force:
        raise SettingsError(f"{out_path} already exists; choose another name or allow overwriting "
                            "(--force). Nothing was written.")
    if os.path.isfile(tokenizer_folder):
        config = quantized_config(tokenizer_folder)
    else:
        config = read_json(os.path.join(tokenizer_folder, "config.json"))
    source = WeightIndex(tokenizer_folder)
    quantized = {n: m for n, m in backbone.named_modules() if isinstance(m, QUANTIZED)}
    layers, items = {}, []
    state = backbone.state_dict()
    for name, t in state.items():
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf in ("weight", EARLIER_SCALE):
            if leaf == "weight":
                stored = stored_from_module(quantized[owner])
                layers[owner] = layer_entry(fmt, stored)
                items += [_memory_item(f"{owner}.weight", stored["weight"]),
                          _memory_item(f"{owner}.{SCALE}", stored[SCALE])]
            continue
        if name == "lm_head.weight" and not lm_head:
            continue
        if name not in source:
            items.append(_memory_item(name, t))
            continue
        if source.shapes[name] != tuple(t.shape):
            raise CheckpointError(f"{tokenizer_folder}: {name} has shape {source.shapes[name]} there but "
                                  f"{tuple(t.shape)} in the backbone: pass the folder the backbone was loaded from.")
        items.append(_source_item(source, name))
    extra = [n for n in source.keys() if n.startswith("image_head.") or (lm_head and n == "lm_head.weight")]
    items += [_source_item(source, n) for n in sorted(extra) if n not in state]
    metadata = {"format": "pt", META_KEY: metadata_entry(layers), META_FORMAT: fmt,
                META_CONFIG: json.dumps(config, sort_keys=True), META_VARIANT: model_variant(tokenizer_folder)}
    _write_atomic(out_path, items, metadata)
    return out_path


def _memory_item(name: str, t: torch.Tensor):
    return name, DTYPES[t.dtype], tuple(t.shape), t.numel() * t.element_size(), t


def _source_item(index: WeightIndex, name: str):
    begin, end = index.offsets[name]
    return name, index.dtypes[name], index.shapes[name], end - begin, (index.files[name], begin)


def _write_atomic(out_path: str, items: list, metadata: dict) -> None:
    # the temporary name is not *.safetensors: a leftover of a killed conversion is never taken for weights
    with atomic_file(out_path) as tmp, open(tmp, "wb") as fh:
        _write(fh, items, metadata)


def _write(fh, items: list, metadata: dict) -> None:
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape, nbytes, _ in items:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    fh.write(struct.pack("<Q", len(raw)))
    fh.write(raw)
    for _name, _dtype, _shape, nbytes, data in items:
        if isinstance(data, torch.Tensor):
            t = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            fh.write(t.numpy().data)
        else:
            _copy_bytes(fh, *data, nbytes)


def _copy_bytes(fh, path: str, begin: int, nbytes: int, chunk: int = 64 << 20) -> None:
    with open(path, "rb") as src:
        src.seek(data_start(path) + begin)
        while nbytes:
            buf = src.read(min(chunk, nbytes))
            if not buf:
                raise CheckpointError(f"{path} ended early while copying from it: download it again.")
            fh.write(buf)
            nbytes -= len(buf)
