"""Loading the three model parts from the folders the Hugging Face repos download to.

A model folder (config.json, safetensors, tokenizer files, vae/) gives the backbone + tokenizer
and the flow head; the VAE comes from its `vae/` subfolder, a standalone VAE folder, or a single
file. When a folder is not what a loader needs, the error says what it looks like instead.
"""
from __future__ import annotations

import json
import os

import torch

from .backbone import Backbone
from .config import backbone_config, flow_head_config, read_json
from .errors import CheckpointError
from .flow_head import FlowHead
from .weights.convention import host_module_from_stored, module_from_stored, quantize_stored
from .weights.quant import LINEARS, check_device, check_format
from .weights.quant_file import (MAKE_ONE, META_VARIANT, check_declared, file_format, file_metadata, is_earlier_layout,
                                 pick_quantized, quantized_config, read_stored, scan)
from .tokenizer import NextStepTokenizer
from .vae import NextStepVAE, VAEConfig
from .variants import FALLBACK, NAMES, named_by
from .weights.reading import WeightIndex, load_torch_state, safetensors_header, check_shapes

HEAD_PREFIX = "image_head."
VARIANTS = NAMES


def describe_folder(path: str) -> str:
    """A short guess at what a folder or file is, for error messages."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isfile(path):
        return f"is a file, not a folder ({os.path.basename(path)})"
    files = set(os.listdir(path))
    cfg = {}
    if "config.json" in files:
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (OSError, ValueError):
            return "has an unreadable config.json"
    if cfg.get("model_type") == "nextstep" or "image_placeholder_id" in cfg:
        return "is a NextStep model folder"
    if {"checkpoint.pt"} & files or ("z_channels" in cfg and "ch_mult" in cfg):
        return "looks like a NextStep VAE (tokenizer) folder, not a model folder"
    if "model_index.json" in files:
        return "looks like a diffusers pipeline folder"
    if cfg.get("model_type") in ("qwen2", "llama"):
        return f"looks like a plain {cfg['model_type']} language model without NextStep's image parts"
    if not files:
        return "is empty"
    return "does not look like a NextStep checkpoint (no NextStep config.json)"


def _model_config(folder: str) -> dict:
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointError(
            f"{folder} {describe_folder(folder)}. Point the loader at the folder a NextStep repo downloads to "
            "(e.g. stepfun-ai/NextStep-1-Large), which holds config.json, model*.safetensors and the tokenizer files.")
    cfg = read_json(os.path.join(folder, "config.json"))
    if not (cfg.get("model_type") == "nextstep" or "image_placeholder_id" in cfg):
        raise CheckpointError(f"{folder} {describe_folder(folder)}; a NextStep model folder's config.json has "
                              "model_type 'nextstep'.")
    return cfg


def model_variant(folder: str) -> str:
    """Which released model a folder holds, from its name (the repos share one config class); a
    pre-quantized file records the variant of the folder it was made from."""
    if os.path.isfile(folder) and folder.endswith(".safetensors"):
        recorded = file_metadata(folder).get(META_VARIANT)
        if recorded in VARIANTS:
            return recorded
        folder = os.path.dirname(os.path.abspath(folder))
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    # the folder's own name first; then names above it that mention NextStep, since the Hugging Face
    # cache keeps the repo name above the snapshot: .../models--stepfun-ai--NextStep-1-Large-Edit/snapshots/<hash>
    for name in [parts[-1]] + [p for p in reversed(parts[:-1]) if "nextstep" in p.lower()]:
        named = named_by(name)
        if named is not None:
            return named
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        cfg = read_json(cfg_path)
        if "genloss_width" in cfg or cfg.get("base_image_grid_size") == 64:
            return "nextstep1.1"
    elif os.path.isdir(folder):
        found, _ = scan(folder)
        recorded = {file_metadata(p).get(META_VARIANT) for ps in found.values() for p in ps}
        if len(recorded) == 1 and next(iter(recorded)) in VARIANTS:
            return next(iter(recorded))
    return FALLBACK



def load_backbone(folder: str, device="cpu", dtype=torch.float32, with_lm_head: bool = False,
                  quant: str | None = None, ops=torch.nn, quant_linear=None):
    """-> (Backbone, NextStepTokenizer). `lm_head` (1.5 GB at 14B) is read only for text generation.

    `quant` ('int8' / 'fp8' / 'int4') quantizes the decoder layers while loading, one layer at a time, so
    the full-precision model never sits in memory whole. `folder` may also be a pre-quantized
    file (see weights/quant_file.py) or a folder holding one; its tokenizer is read from the file's folder.
    `dtype` is the compute dtype: everything that is not quantized is cast to it. `ops` supplies the layer
    classes (Linear, Embedding), so a host can substitute its own (e.g. ComfyUI's comfy.ops).
    `quant_linear`: a host's Linear class for the quantized decoder matrices, loaded from ComfyUI's
    convention (`weight`, `weight_scale`, `comfy_quant`); None: the engine's own quantized modules."""
    if quant is not None:
        check_device(check_format(quant), device)
    qfile = pick_quantized(folder, quant)
    if qfile is not None:
        check_device(file_format(qfile), device)
        return _load_prequantized(qfile, device, dtype, with_lm_head, ops, quant_linear)
    cfg_json = _model_config(folder)
    tok = NextStepTokenizer(folder)
    index = WeightIndex(folder)
    if "image_in_projector.weight" not in index:
        raise CheckpointError(f"{folder} has no image_in_projector weights: it looks like a plain language model, "
                              "not NextStep. Download a NextStep repo.")
    cfg = backbone_config(cfg_json, o_bias="layers.0.self_attn.o_proj.bias" in index)
    _check_ids(cfg, tok, folder)
    with torch.device("meta"):
        model = Backbone(cfg, with_lm_head=False, placeholder_id=tok.placeholder_id, ops=ops)
    if quant is None:
        index.load_into(model, "", device, dtype)
    else:
        _load_quantizing(model, index, device, dtype, quant, quant_linear)
    return _finish(model, folder, with_lm_head), tok


def _load_quantizing(model: Backbone, index: WeightIndex, device, dtype, quant: str, quant_linear=None) -> None:
    """Each matrix arrives in its stored precision and is quantized at once, so peak memory is the
    quantized model plus one full-precision matrix."""
    for name, child in model.named_children():
        if name != "layers":
            index.load_into(child, name + ".", device, dtype)
    _quantized_layers(model, index, device, dtype, quant,
                      lambda layer: quantize_stored(index.tensor(layer + ".weight", device), quant), quant_linear)


def _quantized_layers(model: Backbone, index: WeightIndex, device, dtype, fmt: str, stored_of,
                      quant_linear=None) -> None:
    """Where quantizing while loading and reading a pre-quantized file meet: `stored_of(layer name)`
    gives a matrix's tensors in ComfyUI's convention (weights/convention.py), and the module is made
    from them the same way for both, so a file gives the tokens of quantizing at load."""
    matrices = {p + ".weight" for p in LINEARS}
    for i, layer in enumerate(model.layers):
        index.load_into(layer, f"layers.{i}.", device, dtype, skip=matrices)
        for path in LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            stored = {k: v.to(device) for k, v in stored_of(f"layers.{i}.{path}").items()}
            old = getattr(parent, name)
            if quant_linear is None:
                setattr(parent, name, module_from_stored(fmt, stored, old.bias))
            else:
                setattr(parent, name, host_module_from_stored(quant_linear, fmt, stored, old.bias, old.in_features,
                                                              old.out_features))


def _load_prequantized(path: str, device, dtype, with_lm_head: bool, ops=torch.nn, quant_linear=None):
    folder = os.path.dirname(os.path.abspath(path))
    cfg_json = quantized_config(path)
    try:
        tok = NextStepTokenizer(folder)
    except CheckpointError as exc:
        raise CheckpointError(f"{path} is a pre-quantized backbone; its tokenizer is read from the folder it lies "
                              f"in. {exc}") from None
    index = WeightIndex(path)
    fmt = file_format(path)
    if "image_in_projector.weight" not in index:
        raise CheckpointError(f"{path} says it is a {fmt} NextStep backbone but lacks its weights (no "
                              f"image_in_projector): it is damaged or was not written by `{MAKE_ONE}`. Make it again.")
    cfg = backbone_config(cfg_json, o_bias="layers.0.self_attn.o_proj.bias" in index)
    _check_ids(cfg, tok, path)
    earlier = is_earlier_layout(path)
    if earlier:
        import warnings
        warnings.warn(f"{os.path.basename(path)} is in the pack's earlier {fmt} layout; it is converted while loading "
                      f"(ComfyUI reads only the new one). To skip this, make it again: `python -m nextstep_core "
                      f"quantize --model {os.path.basename(path)} --out NEW.safetensors`.", stacklevel=2)
    else:
        check_declared(path, index, fmt, cfg.num_layers)
    with torch.device("meta"):
        model = Backbone(cfg, with_lm_head=False, placeholder_id=tok.placeholder_id, ops=ops)
    for name, child in model.named_children():
        if name != "layers":
            index.load_into(child, name + ".", device, dtype)
    _quantized_layers(model, index, device, dtype, fmt, lambda layer: read_stored(path, index, layer, fmt, earlier),
                      quant_linear)
    return _finish(model, path, with_lm_head), tok


def _finish(model: Backbone, source: str, with_lm_head: bool) -> Backbone:
    model.source = source
    if with_lm_head:
        attach_lm_head(model)
    return model.eval().requires_grad_(False)


def attach_lm_head(model: Backbone) -> Backbone:
    """Read the LM head (1.5 GB at 14B) into an already loaded backbone, when text generation
    (Self-CoT) first needs it; a no-op when it is there."""
    if model.lm_head is not None:
        return model
    cfg = model.cfg
    if cfg.tie_word_embeddings:
        head = model.linear_class(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
        head.weight = model.embed_tokens.weight
    else:
        index = WeightIndex(model.source)
        if "lm_head.weight" not in index:
            hint = (" It is a pre-quantized file made without the LM head: make it again without --no-lm-head, or "
                    "load the full model folder." if os.path.isfile(model.source) else "")
            raise CheckpointError(f"{model.source} has no lm_head weights, which Self-CoT needs.{hint}")
        with torch.device("meta"):
            head = model.linear_class(cfg.hidden_size, cfg.vocab_size, bias=False)
        index.load_into(head, "lm_head.", model.weights_device(), model.dtype)
    model.lm_head = head.eval().requires_grad_(False)
    return model


def _check_ids(cfg, tok: NextStepTokenizer, folder: str) -> None:
    for key, actual in (("boi", tok.boi_id), ("eoi", tok.eoi_id), ("image_placeholder_id", tok.placeholder_id)):
        want = cfg.ids.get(key)
        if want is not None and want != actual:
            raise CheckpointError(f"{folder}: config.json says {key}={want} but the tokenizer has id {actual}; the "
                                  "tokenizer files belong to another model. Download them from the same repo.")
    if len(tok) > cfg.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {len(tok)} tokens but the model only {cfg.vocab_size}.")


def load_flow_head(folder: str, device="cpu", dtype=torch.float32, ops=torch.nn) -> FlowHead:
    """From a model folder, or from a pre-quantized file (which carries the head unchanged)."""
    qfile = pick_quantized(folder, None)
    if qfile is not None:
        cfg_json, index, folder = quantized_config(qfile), WeightIndex(qfile), qfile
    else:
        cfg_json, index = _model_config(folder), WeightIndex(folder)
    if HEAD_PREFIX + "net.input_proj.weight" not in index:
        raise CheckpointError(f"{folder} has no flow head (image_head.*) weights.")
    token_dim = index.shapes[HEAD_PREFIX + "net.input_proj.weight"][1]
    with torch.device("meta"):
        head = FlowHead(flow_head_config(cfg_json, token_dim), ops)
    index.load_into(head, HEAD_PREFIX, device, dtype)
    return head.eval().requires_grad_(False)


def _vae_files(path: str):
    """-> (config dict or None, weights file) for a VAE folder, a model folder with vae/, or a file."""
    if os.path.isfile(path) and path.endswith(".safetensors") and file_format(path) is not None:
        path = os.path.dirname(os.path.abspath(path))  # a pre-quantized backbone: its folder holds vae/
    if os.path.isfile(path):
        cfg_path = os.path.join(os.path.dirname(path), "config.json")
        cfg = read_json(cfg_path) if os.path.isfile(cfg_path) else None
        if cfg is not None and ("z_channels" not in cfg):
            cfg = None  # a neighbouring config.json of something else
        return cfg, path
    if not os.path.isdir(path):
        raise CheckpointError(f"VAE path {path} does not exist.")
    if os.path.isdir(os.path.join(path, "vae")) and not os.path.isfile(os.path.join(path, "checkpoint.pt")):
        path = os.path.join(path, "vae")
    files = os.listdir(path)
    weights = [f for f in ("checkpoint.pt", "diffusion_pytorch_model.safetensors", "model.safetensors") if f in files]
    weights += sorted(f for f in files if f.endswith(".safetensors") and f not in weights
                      and file_format(os.path.join(path, f)) is None)
    if not weights:
        raise CheckpointError(
            f"{path} {describe_folder(path)} and has no VAE weights (checkpoint.pt or .safetensors). Download "
            "vae/config.json and vae/checkpoint.pt from a NextStep repo (or stepfun-ai/NextStep-1-f8ch16-Tokenizer).")
    cfg_path = os.path.join(path, "config.json")
    return (read_json(cfg_path) if os.path.isfile(cfg_path) else None), os.path.join(path, weights[0])


def load_vae(path: str, device="cpu", dtype=torch.float32, ops=torch.nn) -> NextStepVAE:
    cfg_json, weights = _vae_files(path)
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file
        header = safetensors_header(weights)
        meta = header.get("__metadata__") or {}
        if cfg_json is None and "nextstep_vae_config" in meta:
            cfg_json = json.loads(meta["nextstep_vae_config"])
        state = load_file(weights)
    else:
        state = load_torch_state(weights)
    state = {k[len("vae."):] if k.startswith("vae.") else k: v for k, v in state.items()}
    if "encoder.conv_in.weight" not in state or "decoder.conv_out.weight" not in state:
        some = ", ".join(list(state)[:3])
        raise CheckpointError(f"{weights} is not a NextStep/Flux-layout VAE (keys start {some}). Use the "
                              "vae/checkpoint.pt of a NextStep repo.")
    if cfg_json is None:
        # A bare file: assume the released NextStep tokenizer's config, channel norm included. (Flux's
        # ae.safetensors has the same layout but other weights and latent scaling: it cannot be told
        # apart by shapes, so the loaders' help says to use the NextStep repo's vae/.)
        import warnings
        warnings.warn(f"{weights} has no config.json beside it: assuming the NextStep-1 VAE config "
                      "(encoder_norm on, scale 1, shift 0).")
        cfg_json = {"encoder_norm": True}
    cfg = VAEConfig.from_json(cfg_json)
    if state["encoder.conv_out.weight"].shape[0] != 2 * cfg.z_channels:
        raise CheckpointError(f"{weights} has no config.json next to it and is not the standard NextStep VAE.")
    with torch.device("meta"):
        vae = NextStepVAE(cfg, ops)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    extra = sorted(set(state) - set(vae.state_dict()))
    if extra:
        raise CheckpointError(f"{weights} has weights this VAE config does not expect (e.g. {extra[0]}); its "
                              "config.json belongs to another VAE.")
    check_shapes(vae, state, weights)
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its config.json: {str(exc).splitlines()[0]}") from None
    return vae.eval().requires_grad_(False)


def check_compatible(backbone: Backbone, head: FlowHead, vae: NextStepVAE | None = None) -> None:
    """The three parts come from three loader nodes; say clearly when they do not belong together."""
    if head.cfg.cond_dim != backbone.cfg.hidden_size:
        raise CheckpointError(f"The flow head expects conditions of width {head.cfg.cond_dim} but the backbone's "
                              f"hidden size is {backbone.cfg.hidden_size}: load both from the same model folder.")
    if head.cfg.input_dim != backbone.cfg.token_dim:
        raise CheckpointError(f"The flow head makes {head.cfg.input_dim}-number tokens but the backbone reads "
                              f"{backbone.cfg.token_dim}: load both from the same model folder.")
    if vae is not None and vae.cfg.z_channels != backbone.cfg.latent_channels:
        raise CheckpointError(f"The VAE has {vae.cfg.z_channels} latent channels but the model expects "
                              f"{backbone.cfg.latent_channels}: use the VAE of the NextStep repo (vae/ folder).")
