"""Model configuration read from the official `config.json` files.

Two dialects ship on the Hub: the NextStep-1 one (`fm_head_dim`, `latent_patch_size`, ...) and
the NextStep-1.1 one (`genloss_width`, `patch_size`, ...). Both map onto the same two small
frozen dataclasses so nothing downstream cares which checkpoint it got.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import CheckpointError


@dataclass(frozen=True)
class BackboneConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = True
    o_bias: bool = False
    tie_word_embeddings: bool = False
    latent_channels: int = 16
    latent_patch_size: int = 2
    max_position_embeddings: int = 131072
    ids: dict = field(default_factory=dict)  # boi / eoi / image_placeholder_id / pad_token_id_added from config.json

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.latent_patch_size ** 2


@dataclass(frozen=True)
class FlowHeadConfig:
    input_dim: int
    cond_dim: int
    dim: int = 1536
    layers: int = 12
    mlp_ratio: float = 1.0


def _first(cfg: dict, *names, default=None):
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    return default


def read_json(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the download may be incomplete: "
                              "download it again.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object.")
    return data


def backbone_config(cfg: dict, o_bias: bool) -> BackboneConfig:
    """`o_bias` comes from the weights, not the config: the Aug-2025 config class silently turns a
    missing `o_attention_bias` into `attention_bias`, so only the checkpoint is trustworthy."""
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        ids = {k: cfg[k] for k in ("boi", "eoi", "image_placeholder_id", "pad_token_id_added") if cfg.get(k) is not None}
        return BackboneConfig(
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(_first(cfg, "num_key_value_heads", default=heads)),
            head_dim=int(_first(cfg, "head_dim", default=hidden // heads)),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(_first(cfg, "rms_norm_eps", default=1e-6)),
            rope_theta=float(_first(cfg, "rope_theta", default=10000.0)),
            attention_bias=bool(_first(cfg, "attention_bias", default=True)),
            o_bias=o_bias,
            tie_word_embeddings=bool(_first(cfg, "tie_word_embeddings", default=False)),
            latent_channels=int(_first(cfg, "latent_channels", "num_channels", default=16)),
            latent_patch_size=int(_first(cfg, "latent_patch_size", "patch_size", default=2)),
            max_position_embeddings=int(_first(cfg, "max_position_embeddings", default=131072)),
            ids=ids,
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks the field {exc.args[0]!r} that every NextStep config has.") from None


def flow_head_config(cfg: dict, input_dim: int) -> FlowHeadConfig:
    return FlowHeadConfig(
        input_dim=input_dim,
        cond_dim=int(cfg["hidden_size"]),
        dim=int(_first(cfg, "fm_head_dim", "genloss_width", default=1536)),
        layers=int(_first(cfg, "fm_head_layers", "genloss_depth", default=12)),
        mlp_ratio=float(_first(cfg, "fm_head_mlp_ratio", default=1.0)),
    )
