"""Pre-quantized single-file checkpoints: the quantized backbone (int8, fp8 or int4), its LM head and
the flow head in one .safetensors, so a 14B model is a ~16 GB download in int8 or fp8 (less in int4)
instead of ~30 GB.

Layout: the seven decoder matrices of every layer in ComfyUI's convention for quantized layers
(`<name>.weight` + `<name>.weight_scale`, declared in the header's `_quantization_metadata`; see
convention.py), so ComfyUI's mixed-precision layers read the same file; every other tensor
(embeddings, norms, biases, projectors, `lm_head.weight`, `image_head.*`) copied byte for byte from
the source checkpoint. The header metadata also carries `nextstep_quant` (the pack's name of the
format), `nextstep_config` (the source config.json) and `nextstep_variant`, so the file needs no
config.json beside it. The pack's earlier files (`<name>.scale`, no `_quantization_metadata`) still
load: `read_stored` converts each matrix while loading. The tokenizer files and `vae/`
are not inside: they are read from the folder the file sits in (the model folder, or a folder
holding the file, the tokenizer files and `vae/`).

quant_write.py writes such files.
"""
from __future__ import annotations

import json
import os

import torch

from ..errors import CheckpointError, SettingsError
from .convention import CORE_FORMAT, EARLIER_SCALE, META_KEY, SCALE, STORED_DTYPES, declared_layers, from_earlier
from .quant import FORMATS, LINEARS
from .reading import INDEX, WeightIndex, safetensors_header

META_FORMAT, META_CONFIG, META_VARIANT = "nextstep_quant", "nextstep_config", "nextstep_variant"
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8",
          torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}
ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
             "vocab_size")
MAKE_ONE = "python -m nextstep_core quantize --model MODEL_FOLDER --format int8|fp8|int4 --out FILE.safetensors"


def file_metadata(path: str) -> dict:
    return safetensors_header(path).get("__metadata__") or {}


def file_format(path: str) -> str | None:
    """The weight format (int8, fp8 or int4) a .safetensors file was written in, or None for ordinary
    weights."""
    fmt = file_metadata(path).get(META_FORMAT)
    if fmt is not None and fmt not in FORMATS:
        raise CheckpointError(f"{path} holds weights in the format {fmt!r}, which this version does not know "
                              f"({', '.join(FORMATS)}): update the node pack, or make the file again with "
                              f"`{MAKE_ONE}`.")
    return fmt


def scan(folder: str) -> tuple[dict, bool]:
    """-> ({format: [pre-quantized files]}, whether the folder also has ordinary weights)."""
    found: dict[str, list] = {}
    full = os.path.isfile(os.path.join(folder, INDEX))
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors") and os.path.isfile(path):
            fmt = file_format(path)
            if fmt is None:
                full = True
            else:
                found.setdefault(fmt, []).append(path)
    return found, full


def pick_quantized(path: str, quant: str | None) -> str | None:
    """The pre-quantized file to load for `path`, or None to read the folder's ordinary weights.

    A file path must be a pre-quantized file. In a folder, a file of the asked format wins;
    without one, ordinary weights win (quantized while loading when `quant` is set); a folder
    with only a pre-quantized file uses it."""
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        return None  # the folder loaders say what such a file is
    if os.path.isfile(path):
        if file_format(path) is None:
            raise CheckpointError(
                f"{path} is not a pre-quantized NextStep file (its header has no {META_FORMAT} entry). Give the model "
                f"folder instead (with a weight format to quantize it while loading), or make such a file with "
                f"`{MAKE_ONE}`.")
        fmt = file_format(path)
        if quant is not None and quant != fmt:
            raise SettingsError(f"{path} holds {fmt} weights but {quant} was asked: choose {fmt} (or none), or give "
                                f"the full-precision model folder to quantize it as {quant} while loading.")
        return path
    if not os.path.isdir(path):
        return None
    found, full = scan(path)
    if quant is not None and found.get(quant):
        return _one(path, found[quant])
    if full or not found:
        return None
    if quant is None and len(found) == 1:
        return _one(path, next(iter(found.values())))
    if quant is None:
        names = ", ".join(os.path.basename(p) for ps in found.values() for p in ps)
        raise CheckpointError(f"{path} holds pre-quantized files of several formats ({names}) and no full weights: "
                              "choose the format, or give the path of the file to use.")
    have = ", ".join(f"{os.path.basename(p)} ({f})" for f, ps in found.items() for p in ps)
    raise SettingsError(f"{path} has no {quant} weights, only {have}, and no full-precision weights to quantize: "
                        f"choose {' or '.join(found)}, or download the full model.")


def _one(folder: str, files: list) -> str:
    if len(files) > 1:
        names = ", ".join(os.path.basename(p) for p in files)
        raise CheckpointError(f"{folder} holds several pre-quantized files of the same format ({names}): keep one, "
                              "or give the path of the file to use.")
    return files[0]


def quantized_config(path: str) -> dict:
    meta = file_metadata(path)
    try:
        cfg = json.loads(meta[META_CONFIG])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path} has no readable {META_CONFIG} entry in its header: it was not written by "
                              f"`{MAKE_ONE}` or is damaged. Make it again.") from None
    folder = os.path.dirname(os.path.abspath(path))
    beside = os.path.join(folder, "config.json")
    if os.path.isfile(beside):
        from ..config import read_json
        other = read_json(beside)
        if other.get("model_type") == "nextstep" or "image_placeholder_id" in other:
            for key in ARCH_KEYS:
                if other.get(key) is not None and cfg.get(key) != other.get(key):
                    raise CheckpointError(
                        f"{path} was made from a model with {key}={cfg.get(key)}, but the config.json beside it says "
                        f"{key}={other.get(key)}: the file belongs to another NextStep model. Put it in a folder with "
                        f"the tokenizer files of the model it was made from, or make it again from this folder with "
                        f"`python -m nextstep_core quantize --model {folder} --format "
                        f"{meta.get(META_FORMAT)} --out FILE.safetensors`.")
    return cfg


def is_earlier_layout(path: str) -> bool:
    """Whether a pre-quantized file is in the pack's earlier layout (before ComfyUI's convention)."""
    return META_KEY not in file_metadata(path)


def check_declared(path: str, index: WeightIndex, fmt: str, layer_count: int) -> None:
    """A file in ComfyUI's convention declares each quantized matrix, with the file's format."""
    layers = declared_layers(file_metadata(path))
    want = {f"layers.{i}.{p}" for i in range(layer_count) for p in LINEARS}
    wrong = sorted(n for n in want if layers.get(n, {}).get("format") != CORE_FORMAT[fmt])
    if wrong:
        raise CheckpointError(f"{path} says it holds {fmt} weights but its {META_KEY} does not declare {wrong[0]} as "
                              f"such: it was not written by `{MAKE_ONE}` or is damaged. Make it again.")


def read_stored(path: str, index: WeightIndex, layer: str, fmt: str, earlier: bool) -> dict:
    """One matrix of a pre-quantized file in ComfyUI's convention (convention.py), on the CPU;
    a file in the pack's earlier layout is converted on the way."""
    scale_name = f"{layer}.{EARLIER_SCALE if earlier else SCALE}"
    names = (f"{layer}.weight", scale_name)
    for name, want in zip(names, STORED_DTYPES[fmt]):
        got = index.dtypes.get(name)
        if got is None:
            raise CheckpointError(f"{path} says it holds {fmt} weights but lacks {name}: it was not written by "
                                  f"`{MAKE_ONE}` or is damaged. Make it again.")
        if got != DTYPES[want]:
            raise CheckpointError(f"{path} says its weights are {fmt}, but {name} is stored as {got} (expected "
                                  f"{DTYPES[want]}): it was not written by `{MAKE_ONE}` or is damaged. Make it again.")
    weight, scale = index.tensor(names[0]), index.tensor(names[1])
    if earlier:
        return from_earlier(fmt, weight, scale)
    return {"weight": weight, SCALE: scale}
