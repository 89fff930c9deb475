"""NextStep's image tokenizer: a Flux-layout f8/16-channel autoencoder with channel-normalised
latents, plus the 2x2 patchify that turns latents into the model's 64-number image tokens.

State-dict names are the original LDM/Flux ones that `vae/checkpoint.pt` uses, so the official
file loads without any key conversion.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .devices import RunsOn


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    channel_norm: bool = True  # `encoder_norm: true` (NextStep-1) or `norm_fn/norm_level` (Edit repo)
    psz: int = 1

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @staticmethod
    def from_json(cfg: dict) -> "VAEConfig":
        """Both shipped dialects: `encoder_norm: true`, or `norm_fn: layer_norm` + `norm_level: channel`.
        The Aug-2025 loader ignores the second and silently skips the normalisation, which breaks
        edit latents; here either turns it on. The Flux dataclass defaults 0.3611/0.1159 are never
        used by the released configs, so missing scale/shift mean identity."""
        norm = bool(cfg.get("encoder_norm", False)) or (
            cfg.get("norm_fn") == "layer_norm" and cfg.get("norm_level", "channel") == "channel")
        return VAEConfig(
            ch=int(cfg.get("ch", 128)), ch_mult=tuple(cfg.get("ch_mult", (1, 2, 4, 4))),
            num_res_blocks=int(cfg.get("num_res_blocks", 2)), z_channels=int(cfg.get("z_channels", 16)),
            in_channels=int(cfg.get("in_channels", 3)), out_ch=int(cfg.get("out_ch", 3)),
            scaling_factor=float(cfg.get("scaling_factor", 1.0)), shift_factor=float(cfg.get("shift_factor", 0.0)),
            channel_norm=norm, psz=int(cfg.get("psz") or 1))


def swish(x):
    return x * torch.sigmoid(x)  # not F.silu: keeps the reference's rounding


def group_norm(c, ops=nn):
    return ops.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, ops=nn):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin, ops), ops.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout, ops), ops.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = ops.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(swish(self.norm2(self.conv1(swish(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, c, ops=nn):
        super().__init__()
        self.norm = group_norm(c, ops)
        self.q, self.k, self.v, self.proj_out = (ops.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (m(h).reshape(b, 1, c, hh * ww).transpose(2, 3).contiguous() for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c, ops=nn):
        super().__init__()
        self.conv = ops.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c, ops=nn):
        super().__init__()
        self.conv = ops.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks, sample=None):
    m = nn.Module()
    m.block = nn.ModuleList(blocks)
    m.attn = nn.ModuleList()
    if sample is not None:
        m.add_module(sample[0], sample[1])
    return m


def _mid(c, ops):
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c, ops), AttnBlock(c, ops), ResnetBlock(c, c, ops)
    return m


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops=nn):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = ops.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * m, ops))
                cin = ch * m
            last = i == len(mult) - 1
            self.down.append(_level(blocks, None if last else ("downsample", Downsample(cin, ops))))
        self.mid = _mid(cin, ops)
        self.norm_out = group_norm(cin, ops)
        self.conv_out = ops.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """`up.{i}` is indexed by resolution level and runs from the highest i down to 0."""

    def __init__(self, cfg: VAEConfig, ops=nn):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        cin = ch * mult[-1]
        self.conv_in = ops.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin, ops)
        levels = []
        for i in reversed(range(len(mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * mult[i], ops))
                cin = ch * mult[i]
            levels.insert(0, _level(blocks, ("upsample", Upsample(cin, ops)) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin, ops)
        self.conv_out = ops.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class NextStepVAE(RunsOn, nn.Module):
    """`ops` supplies Conv2d and GroupNorm, so a host can substitute its own (ComfyUI's comfy.ops)."""

    def __init__(self, cfg: VAEConfig, ops=nn):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, ops)
        self.decoder = Decoder(cfg, ops)

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    def weights_device(self):
        return self.encoder.conv_in.weight.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> latents [B, z, H/8, W/8]: the posterior mean, channel
        LayerNorm'd (no affine, eps 1e-6) at every latent pixel, then scaled and shifted."""
        mean = self.encoder(pixels.to(self.dtype)).chunk(2, dim=1)[0]
        if self.cfg.channel_norm:
            p = self.cfg.psz
            b, c, h, w = mean.shape
            x = mean.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h // p, w // p, c * p * p)
            x = F.layer_norm(x, x.shape[-1:], None, None, 1e-6)
            mean = x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return (mean - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> pixels in [-1, 1] (not clamped)."""
        z = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.decoder(z.to(self.dtype))


def patchify(latents: torch.Tensor, p: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p]; inside a token the index is c*p*p + row*p + col."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, h_tokens: int, w_tokens: int, channels: int = 16, p: int = 2) -> torch.Tensor:
    """Inverse of `patchify`, for any h x w grid (the Aug-2025 code assumed square)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h_tokens, w_tokens, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h_tokens * p, w_tokens * p)
