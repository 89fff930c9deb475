"""Tiny random checkpoints in the exact official on-disk layout, for tests and smoke runs.

Everything is built locally (the tokenizer too), so tests never download anything, and the
files go through the same loaders a real 30 GB download does. The folder is written next to its
destination and renamed into place, so an interrupted write never leaves a half checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

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


def write_tokenizer(folder: str) -> dict:
    """A byte-level BPE with a handful of merges and NextStep's added tokens; returns name -> id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    chars = _bytes_to_unicode()
    vocab = {chars[b]: i for i, b in enumerate(sorted(chars))}
    merges = [("Ġ", "a"), ("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n"), ("e", "r"), ("o", "n"), ("a", "n")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    base = len(vocab)
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    ids = {t: base + i for i, t in enumerate(SPECIALS)}
    entry = lambda t: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    tok_cfg = {"add_prefix_space": False, "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "[PAD]",
               "model_max_length": 131072, "tokenizer_class": "Qwen2Tokenizer", "clean_up_tokenization_spaces": False,
               "additional_special_tokens": SPECIALS[4:],
               "added_tokens_decoder": {str(ids[t]): dict(entry(t), special=True) for t in SPECIALS}}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
        json.dump(tok_cfg, fh, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({"additional_special_tokens": SPECIALS[4:], "eos_token": entry("<|endoftext|>"),
                   "pad_token": entry("[PAD]")}, fh, indent=2)
    return ids


def _randomize(module: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    """Random weights with enough spread that CFG, norms and the head all matter in tests
    (the official init zeroes the adaLN layers, which would make every head output zero)."""
    for name, p in module.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("in_ln.weight"):
            p.data = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        else:
            p.data = std * torch.randn(p.shape, generator=gen)


def write_tiny(out: str, *, edit: bool = False, v11: bool = False, shards: int = 1, o_bias: bool = False,
               hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, mlp: int = 128,
               head_width: int = 64, head_layers: int = 2, vae_ch: int = 32, seed: int = 0, force: bool = False,
               vae_format: str = "pt") -> str:
    if os.path.exists(out) and os.listdir(out) and not force:
        raise SettingsError(f"{out} already exists and is not empty; choose a new folder (nothing was written).")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".nextstep-tiny-", dir=parent)
    try:
        _write(tmp, edit=edit, v11=v11, shards=shards, o_bias=o_bias, hidden=hidden, layers=layers, heads=heads,
               kv_heads=kv_heads, mlp=mlp, head_width=head_width, head_layers=head_layers, vae_ch=vae_ch, seed=seed,
               vae_format=vae_format)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(folder, *, edit, v11, shards, o_bias, hidden, layers, heads, kv_heads, mlp, head_width, head_layers,
           vae_ch, seed, vae_format):
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
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
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    bcfg = backbone_config(cfg, o_bias=o_bias)
    bb = Backbone(bcfg, with_lm_head=True)
    _randomize(bb, gen, 0.5 / hidden ** 0.5)
    head = FlowHead(flow_head_config(cfg, bcfg.token_dim))
    _randomize(head, gen, 1.0 / head_width ** 0.5)
    state = {k: v.contiguous() for k, v in bb.state_dict().items()}
    state.update({"image_head." + k: v.contiguous() for k, v in head.state_dict().items()})
    state["gen_pos_embed"] = torch.zeros(1, 16, hidden)  # the unused buffer official checkpoints carry
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
    with open(os.path.join(vae_dir, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(vcfg, fh, indent=2)
    vae = NextStepVAE(VAEConfig.from_json(vcfg))
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if p.dim() > 1:
                p.data = torch.randn(p.shape, generator=gen) * (1.0 / (p[0].numel()) ** 0.5)
    vstate = {k: v.contiguous() for k, v in vae.state_dict().items()}
    if vae_format == "safetensors":
        save_file(vstate, os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(vstate, os.path.join(vae_dir, "checkpoint.pt"))
