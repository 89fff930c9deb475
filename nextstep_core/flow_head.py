"""The 157M flow-matching head (SimpleMLPAdaLN) with its step-invariant work split out.

Per image token the head is evaluated N times with the same condition and a time grid that is
identical for every token. Only the x-path depends on the step, so `prepare()` computes the
time embeddings, the condition embedding and every adaLN modulation once per token, and
`velocity()` runs just the x-path. Both have one mode that keeps the reference's operations (bit
parity) and a fast one (fused products and kernels; only rounding moves). Parameter names match
`image_head.net.*` in the checkpoints.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .config import FlowHeadConfig
from .devices import RunsOn


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

    def run(self, x, shift, scale1, gate):
        """`scale1` is the reference's `1 + scale`, computed once per token (same bits)."""
        return x + gate * self.mlp(self.in_ln(x) * scale1 + shift)

    def run_fused(self, x, shift, scale1, gate):
        """The same block in six kernels: LayerNorm, modulate (one multiply-add), GEMM, SiLU,
        GEMM, gate + residual (one multiply-add). Only rounding differs from `run`."""
        lin1, lin2 = self.mlp[0], self.mlp[2]
        ln = self.in_ln
        h = torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, ln.eps), scale1)
        return torch.addcmul(x, gate, lin2(F.silu(lin1(h))))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int, ops=nn):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(dim, 2 * dim))

    def run(self, x, shift, scale1):
        return self.linear(self.norm_final(x) * scale1 + shift)

    def run_fused(self, x, shift, scale1):
        return self.linear(torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], None, None, self.norm_final.eps), scale1))


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
            shift, scale, gate = blk.adaLN_modulation(y).chunk(3, dim=-1)
            h = blk.run(h, shift, 1 + scale, gate)
        shift, scale = self.final_layer.adaLN_modulation(y).chunk(2, dim=-1)
        return self.final_layer.run(h, shift, 1 + scale)


class FlowHead(RunsOn, nn.Module):
    """`image_head` of the checkpoint; all sampling logic lives in samplers.py."""

    def __init__(self, cfg: FlowHeadConfig, ops=nn):
        super().__init__()
        self.cfg = cfg
        self.net = SimpleMLPAdaLN(cfg, ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.net.input_proj.weight.dtype

    def weights_device(self) -> torch.device:
        return self.net.input_proj.weight.device

    def _apply(self, fn, recurse=True):
        """A move or cast leaves nothing behind: the fused adaLN layout goes, and so does a kept CUDA
        graph capture that read the old weights (see Backbone._apply)."""
        self.__dict__.pop("_adaln", None)
        out = super()._apply(fn, recurse)
        from .graphs import release_if_moved
        release_if_moved(self)
        return out

    def time_embeddings(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """[steps, rows, dim]. Computed with `rows` identical rows per step, as the reference
        does, so the result is bit-equal to evaluating inside the loop; done once per run."""
        t = t.to(self.dtype)  # the reference casts t to the condition dtype before embedding
        return torch.stack([self.net.time_embed(ti.expand(rows)) for ti in t])

    def fused_modulation(self):
        """Every adaLN Linear (12 blocks + final) reads the same SiLU(y): one product for all."""
        mods = [b.adaLN_modulation[1] for b in self.net.res_blocks] + [self.net.final_layer.adaLN_modulation[1]]
        f = getattr(self, "_adaln", None)
        if f is None or any(a is not b for a, b in zip(f.mods, mods)):
            from .fused import fused_linear
            f = self._adaln = fused_linear(mods)
        return f

    def prepare(self, c: torch.Tensor, t_emb: torch.Tensor, fast: bool) -> list:
        """Everything that depends only on (t, c) for one token: per step a sequence of [rows, dim]
        tensors, (shift, 1 + scale, gate) per block, then the final layer's (shift, 1 + scale).
        `fast`: one SiLU and one batched product for every adaLN output of every step (see
        `fused_modulation`), laid out [output, step, rows, dim] so that one unbind gives every
        step's tensors, and one in-place add for every 1 + scale; otherwise each adaLN layer once
        per step with the reference's row count (bit-equal to evaluating inside the loop)."""
        y = t_emb + self.net.cond_embed(c)[None]  # [steps, rows, dim]
        steps, rows, dim = y.shape
        seqs = [b.adaLN_modulation for b in self.net.res_blocks] + [self.net.final_layer.adaLN_modulation]
        if not fast:
            out = []
            for seq in seqs:
                o = torch.stack([seq(y[s]) for s in range(steps)])
                parts = list(o.chunk(o.shape[-1] // dim, dim=-1))
                parts[1] = 1 + parts[1]
                out += [p.unbind(0) for p in parts]
            return list(zip(*out))
        out = self._modulations(F.silu(y), seqs)  # [outputs, steps, rows, dim]
        # 1 + scale in place, on the scale of every (shift, scale, gate) triple and of the final
        # (shift, scale): nothing is created and kept here, which a compiled step would guard on
        out[1::3].add_(1)
        every = out.view(-1, rows, dim).unbind(0)
        return [every[i::steps] for i in range(steps)]

    def _modulations(self, y: torch.Tensor, seqs) -> torch.Tensor:
        """Every adaLN Linear of SiLU(y) [steps, rows, dim], as [outputs, steps, rows, dim]. With
        the fused weight, one batched product (each output's [dim, dim] slice of it against all
        steps' rows) writes that layout directly, and is faster on a CPU than the one wide product
        followed by a transposing copy; otherwise the products are reordered by one copy."""
        steps, rows, dim = y.shape
        f = self.fused_modulation()
        if f is not None and not f.quant:
            t = f.tensors()
            w = t["weight"].view(-1, dim, t["weight"].shape[-1]).transpose(1, 2)
            x = y.view(1, steps * rows, -1).expand(w.shape[0], -1, -1)
            out = torch.bmm(x, w) if t["bias"] is None else torch.baddbmm(t["bias"].view(-1, 1, dim), x, w)
            return out.view(-1, steps, rows, dim)
        out = f(y) if f is not None else torch.cat([seq[1](y) for seq in seqs], dim=-1)
        return out.view(steps, rows, -1, dim).permute(2, 0, 1, 3).contiguous()

    def velocity(self, x: torch.Tensor, mods: list, fast: bool) -> torch.Tensor:
        """x-path for one step, from that step's entry of `prepare`: [rows, input_dim] in the head
        dtype -> velocity in the head dtype."""
        h = self.net.input_proj(x)
        for i, blk in enumerate(self.net.res_blocks):
            h = (blk.run_fused if fast else blk.run)(h, *mods[3 * i:3 * i + 3])
        return (self.net.final_layer.run_fused if fast else self.net.final_layer.run)(h, mods[-2], mods[-1])
