"""Tiny random checkpoints in the exact official on-disk layout, for tests and smoke runs.

Everything is built locally (the tokenizer too), so tests never download anything, and the
files go through the same loaders a real 30 GB download does. The folder is written next to its
destination and renamed into place, so an interrupted write never leaves a half checkpoint.
"""
from __future__ import annotations

import json
import os

import torch

from .atomic_write import atomic_folder
from .backbone import Backbone
from .config import backbone_config, flow_head_config
from .errors import SettingsError
from .flow_head import FlowHead
from .vae import NextStepVAE, VAEConfig

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[PAD]", "<|image_area|>", "<|begin_of_image|>",
            "<|end_of_image|>", "<|image_placeholder|>", "<|begin_of_prompt_refinement|>",
            "<|end_of_prompt_refinement|>", "<|begin_of_thinking|>", "<|end_of_thinking|>"]


def _bytes_to_unicode():
    """GPT-2's printable stand-ins for the 256 byte values (what ByteLevel BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _entry(token: str) -> dict:
    return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _write_json(folder: str, name: str, obj) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def write_tokenizer(folder: str) -> dict:
    """A byte-level BPE with a handful of merges and NextStep's added tokens; returns name -> id.

    tokenizer.json is written as JSON by us rather than by `tokenizers.Tokenizer.save`, so its
    bytes do not depend on the installed `tokenizers` version (the goldens name these files by hash)."""
    chars = _bytes_to_unicode()
    vocab = {chars[b]: i for i, b in enumerate(sorted(chars))}
    merges = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("e", "r"), ("o", "n"), ("a", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    base = len(vocab)
    ids = {t: base + i for i, t in enumerate(SPECIALS)}
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    _write_json(folder, "tokenizer.json", {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [dict(_entry(t), id=ids[t], special=True) for t in SPECIALS],
        "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", **byte_level}, "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": [f"{a} {b}" for a, b in merges]}})
    _write_json(folder, "vocab.json", vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8", newline="\n") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    _write_json(folder, "tokenizer_config.json", {
        "add_prefix_space": False, "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "[PAD]",
        "model_max_length": 131072, "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False,
        "additional_special_tokens": SPECIALS[4:],
        "added_tokens_decoder": {str(ids[t]): dict(_entry(t), special=True) for t in SPECIALS}})
    _write_json(folder, "special_tokens_map.json", {
        "additional_special_tokens": SPECIALS[4:], "eos_token": _entry("<|endoftext|>"), "pad_token": _entry("[PAD]")})
    return ids


class _Draws:
    """Uniform draws with a chosen standard deviation, the same numbers on every machine.

    numpy's legacy RandomState stream is frozen across numpy versions, and the mapping to floats
    uses only exactly rounded arithmetic, so the tiny checkpoints (and with them the goldens made
    from them) do not depend on the CPU, the OS or the torch version (torch.randn does: its
    Box-Muller kernel is vectorized differently per CPU)."""

    def __init__(self, seed: int):
        import numpy as np
        self._rng = np.random.RandomState(seed)

    def __call__(self, shape, std: float, mean: float = 0.0) -> torch.Tensor:
        import numpy as np
        n = int(np.prod(shape)) if len(shape) else 1
        u = self._rng.random_sample(n) * 2.0 - 1.0  # [-1, 1): variance 1/3
        return torch.from_numpy((u * (std * 3.0 ** 0.5) + mean).astype(np.float32)).reshape(tuple(shape))


def _randomize(module: torch.nn.Module, draw: _Draws, std: float) -> None:
    """Random weights with enough spread that CFG, norms and the head all matter in tests
    (the official init zeroes the adaLN layers, which would make every head output zero)."""
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("in_ln.weight"):
            p.data = draw(p.shape, 0.1, mean=1.0)
        else:
            p.data = draw(p.shape, std)


def write_tiny(out: str, *, edit: bool = False, v11: bool = False, shards: int = 1, o_bias: bool = False,
               hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, mlp: int = 128,
               head_width: int = 64, head_layers: int = 2, vae_ch: int = 32, seed: int = 0, force: bool = False,
               vae_format: str = "pt") -> str:
    if os.path.exists(out) and os.listdir(out) and not force:
        raise SettingsError(f"{out} already exists and is not empty; choose a new folder (nothing was written).")
    with atomic_folder(out, replace=True) as tmp:
        _write(tmp, edit=edit, v11=v11, shards=shards, o_bias=o_bias, hidden=hidden, layers=layers, heads=heads,
               kv_heads=kv_heads, mlp=mlp, head_width=head_width, head_layers=head_layers, vae_ch=vae_ch, seed=seed,
               vae_format=vae_format)
    return out


def _write(folder, *, edit, v11, shards, o_bias, hidden, layers, heads, kv_heads, mlp, head_width, head_layers,
           vae_ch, seed, vae_format):
    from safetensors.torch import save_file
    draw = _Draws(seed)
    ids = write_tokenizer(folder)
    vocab = ((max(ids.values()) + 1 + 63) // 64) * 64
    cfg = {"architectures": ["NextStep"], "model_type": "nextstep", "attention_bias": True, "o_attention_bias": o_bias,
           "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"], "head_dim": hidden // heads,
           "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": mlp, "max_position_embeddings": 8192,
           "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
           "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
           "vocab_size": vocab, "vae_name_or_path": "vae/", "boi": ids["<|begin_of_image|>"],
           "eoi": ids["<|end_of_image|>"], "image_placeholder_id": ids["<|image_placeholder|>"],
           "pad_token_id_added": ids["[PAD]"], "lm_loss_weight": 0.01}
    if v11:  # the NextStep-1.1 config dialect
        cfg.update({"genloss_width": head_width, "genloss_depth": head_layers, "genloss_batch_mul": 4,
                    "num_channels": 16, "patch_size": 2, "image_size": 64, "base_image_grid_size": 64})
    else:
        cfg.update({"latent_size": 32, "latent_patch_size": 2, "latent_channels": 16, "fm_head_dim": head_width,
                    "fm_head_layers": head_layers, "fm_head_batch_mul": 4, "im_loss_weight": 1.0})
    _write_json(folder, "config.json", cfg)
    bcfg = backbone_config(cfg, o_bias=o_bias)
    bb = Backbone(bcfg, with_lm_head=True)
    _randomize(bb, draw, 0.5 / hidden ** 0.5)
    head = FlowHead(flow_head_config(cfg, bcfg.token_dim))
    _randomize(head, draw, 1.0 / head_width ** 0.5)
    state = {k: v.contiguous() for k, v in bb.state_dict().items()}
    state.update({"image_head." + k: v.contiguous() for k, v in head.state_dict().items()})
    # the unused buffer a checkpoint saved from the official class carries (a 32x32 grid of positions)
    state["gen_pos_embed"] = torch.zeros(1, 32 * 32, hidden)
    names = sorted(state)
    if shards <= 1:
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map, per = {}, (len(names) + shards - 1) // shards
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, os.path.join(folder, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    vae_dir = os.path.join(folder, "vae")
    os.makedirs(vae_dir)
    vcfg = {"resolution": 256, "in_channels": 3, "ch": vae_ch, "out_ch": 3, "ch_mult": [1, 1, 2, 2],
            "num_res_blocks": 1, "z_channels": 16, "shift_factor": 0.0, "scaling_factor": 1.0, "deterministic": True,
            "psz": 1}
    vcfg.update({"norm_fn": "layer_norm", "norm_level": "channel"} if edit else {"encoder_norm": True})
    _write_json(vae_dir, "config.json", vcfg)
    vae = NextStepVAE(VAEConfig.from_json(vcfg))
    with torch.no_grad():  # every conv weight and bias drawn (norms keep their exact 1 / 0 init)
        for module in vae.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.data = draw(module.weight.shape, 1.0 / module.weight[0].numel() ** 0.5)
                if module.bias is not None:
                    module.bias.data = draw(module.bias.shape, 0.02)
    vstate = {k: v.contiguous() for k, v in vae.state_dict().items()}
    if vae_format == "safetensors":
        save_file(vstate, os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(vstate, os.path.join(vae_dir, "checkpoint.pt"))


def digest(folder: str) -> dict:
    """sha256 of every file of a checkpoint folder, keyed by its path inside the folder.

    Text files are hashed as bytes. Weight files are hashed by what they hold (each tensor's name,
    dtype, shape and bytes, in name order), not by their container: torch.save writes a random
    id into every file, and safetensors' header layout belongs to the library version; the
    numbers, which are what the goldens depend on, are fixed."""
    import hashlib
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            h = hashlib.sha256()
            if name.endswith((".safetensors", ".pt")):
                if name.endswith(".pt"):
                    state = torch.load(path, map_location="cpu", weights_only=True)
                else:
                    from safetensors.torch import load_file
                    state = load_file(path)
                for key in sorted(state):
                    t = state[key].contiguous()
                    h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                with open(path, "rb") as fh:
                    h.update(fh.read())
            out[rel] = h.hexdigest()
    return dict(sorted(out.items()))
