"""The 157M flow-matching head (SimpleMLPAdaLN) with its step-invariant work split out.

Per image token the head is evaluated N times with the same condition and a time grid that is
identical for every token. Only the x-path depends on the step, so `prepare()` computes the
time embeddings, the condition embedding and every adaLN modulation once per token, and
`velocity()` runs just the x-path. Parameter names match `image_head.net.*` in the checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import FlowHeadConfig


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the raw flow time t in [0, 1] (not x1000), cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, ops=nn):
        super().__init__()
        self.mlp = nn.Sequential(ops.Linear(256, dim), nn.SiLU(), ops.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, ops=nn):
        super().__init__()
        self.in_ln = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(ops.Linear(dim, hidden), nn.SiLU(), ops.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(dim, 3 * dim))

    def run(self, x, shift, scale, gate):
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int, ops=nn):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(dim, 2 * dim))

    def run(self, x, shift, scale):
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    def __init__(self, cfg: FlowHeadConfig, ops=nn):
        super().__init__()
        self.time_embed = TimestepEmbedder(cfg.dim, ops)
        self.cond_embed = ops.Linear(cfg.cond_dim, cfg.dim)
        self.input_proj = ops.Linear(cfg.input_dim, cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.res_blocks = nn.ModuleList(ResBlock(cfg.dim, hidden, ops) for _ in range(cfg.layers))
        self.final_layer = FinalLayer(cfg.dim, cfg.input_dim, ops)

    def forward(self, x, t, c):
        """The plain network, one evaluation: kept for references and tests."""
        y = self.time_embed(t) + self.cond_embed(c)
        h = self.input_proj(x)
        for blk in self.res_blocks:
            h = blk.run(h, *blk.adaLN_modulation(y).chunk(3, dim=-1))
        return self.final_layer.run(h, *self.final_layer.adaLN_modulation(y).chunk(2, dim=-1))


@dataclass
class Modulations:
    """adaLN outputs for every step of one token: blocks[i] = (shift, scale, gate), each
    [steps, rows, dim]; final = (shift, scale)."""
    blocks: list
    final: tuple


class FlowHead(nn.Module):
    """`image_head` of the checkpoint; all sampling logic lives in samplers.py."""

    def __init__(self, cfg: FlowHeadConfig, ops=nn):
        super().__init__()
        self.cfg = cfg
        self.net = SimpleMLPAdaLN(cfg, ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.net.input_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.net.input_proj.weight.device

    def time_embeddings(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """[steps, rows, dim]. Computed with `rows` identical rows per step, as the reference
        does, so the result is bit-equal to evaluating inside the loop; done once per run."""
        t = t.to(self.dtype)  # the reference casts t to the condition dtype before embedding
        return torch.stack([self.net.time_embed(ti.expand(rows)) for ti in t])

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor, per_step: bool = False) -> Modulations:
        """Everything that depends only on (t, c) for one token. `per_step=True` runs one GEMM per
        step with the reference's row count (bit-equal); otherwise all steps go through one GEMM
        (same maths, one weight read per token instead of one per step)."""
        y = t_emb + self.net.cond_embed(c)[None]  # [steps, rows, dim]
        steps, rows, dim = y.shape

        def mod(seq, chunks):
            if per_step:
                out = torch.stack([seq(y[s]) for s in range(steps)])
            else:
                out = seq(y.reshape(steps * rows, dim)).reshape(steps, rows, -1)
            return out.chunk(chunks, dim=-1)

        blocks = [mod(b.adaLN_modulation, 3) for b in self.net.res_blocks]
        return Modulations(blocks, mod(self.net.final_layer.adaLN_modulation, 2))

    def velocity(self, x: torch.Tensor, mods: Modulations, step: int) -> torch.Tensor:
        """x-path only: [rows, input_dim] in the head dtype -> velocity in the head dtype."""
        h = self.net.input_proj(x)
        for blk, (shift, scale, gate) in zip(self.net.res_blocks, mods.blocks):
            h = blk.run(h, shift[step], scale[step], gate[step])
        shift, scale = mods.final
        return self.net.final_layer.run(h, shift[step], scale[step])
