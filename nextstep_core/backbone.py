"""The causal backbone: a Qwen2-shaped decoder plus NextStep's image projectors.

Written against the official semantics rather than a transformers class so the per-token step
can use our own static cache, take positions as plain ranges (pads included, as the official
code does) and skip the LM head entirely when no text is generated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig
from .kv_cache import StaticKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def attend(q, keys, values, mask):
    """SDPA with grouped-query attention. `enable_gqa` (torch >= 2.5) reads each KV head once
    instead of materialising a repeated copy of the whole cache per layer per token; older
    torch gets the explicit repeat. Both give the same numbers."""
    rep = q.shape[1] // keys.shape[1]
    if rep > 1:
        try:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        except TypeError:
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope:
    """cos/sin tables for positions 0..n-1, computed in float32 then cast (as transformers does)."""

    def __init__(self, head_dim: int, theta: float, length: int, dtype: torch.dtype, device):
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / head_dim))
        pos = torch.arange(length, device=device, dtype=torch.float32)
        freqs = (inv_freq[:, None] @ pos[None, :]).transpose(0, 1)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def slice(self, start: int, count: int):
        return self.cos[start:start + count][None, None], self.sin[start:start + count][None, None]


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig, ops=nn):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = ops.Linear(h, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = ops.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = ops.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = ops.Linear(cfg.num_heads * cfg.head_dim, h, bias=cfg.o_bias)

    def forward(self, x, cos, sin, cache: StaticKVCache, layer: int, start: int, mask, kv_len: int):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache.keys[layer][:, :, start:start + n] = k
        cache.values[layer][:, :, start:start + n] = v
        out = attend(q, cache.keys[layer][:, :, :kv_len], cache.values[layer][:, :, :kv_len], mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


    def forward_at(self, x, cos, sin, cache: StaticKVCache, layer: int, pos: torch.Tensor, mask):
        """One position given as a device tensor: static shapes and addresses, so the step can be
        captured in a CUDA graph and replayed for every token without Python deciding anything."""
        b = x.shape[0]
        q = self.q_proj(x).view(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, 1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache.keys[layer].index_copy_(2, pos, k)
        cache.values[layer].index_copy_(2, pos, v)
        out = attend(q, cache.keys[layer], cache.values[layer], mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, 1, -1))


class MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig, ops=nn):
        super().__init__()
        self.gate_proj = ops.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = ops.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = ops.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig, ops=nn):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, cos, sin, cache, layer, start, mask, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start, mask, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """State-dict names match the official checkpoints (no `model.` prefix)."""

    def __init__(self, cfg: BackboneConfig, with_lm_head: bool = False, ops=nn, placeholder_id: int = -1):
        super().__init__()
        self.cfg = cfg
        self.placeholder_id = placeholder_id
        self.source = ""  # the folder the weights came from, for reading the LM head later
        self.streamer = None  # set by offload.stream_layers in low-VRAM mode
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.image_in_projector = ops.Linear(cfg.token_dim, cfg.hidden_size)
        self.image_out_projector = ops.Linear(cfg.hidden_size, cfg.hidden_size)
        self.lm_head = ops.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if with_lm_head else None
        self._rope: Rope | None = None

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        if max_len > self.cfg.max_position_embeddings:
            from .errors import SettingsError
            raise SettingsError(
                f"This run needs {max_len} positions but the model supports {self.cfg.max_position_embeddings}: "
                "use a smaller size or a shorter prompt/story.")
        need = self.cache_bytes(batch, max_len)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > free:
                from .errors import NextStepError
                raise NextStepError(
                    f"This run needs {need / 2**30:.2f} GiB of GPU memory for its KV cache ({batch} rows x {max_len} "
                    f"positions) but only {free / 2**30:.2f} GiB is free. Use a smaller size, batch or story, "
                    "or free VRAM.")
        return StaticKVCache(self.cfg.num_layers, batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim,
                             self.dtype, self.device)

    def cache_bytes(self, batch: int, max_len: int) -> int:
        """Keys + values for every layer, in the model dtype: what a run needs beyond the weights."""
        c = self.cfg
        return 2 * c.num_layers * batch * c.num_kv_heads * max_len * c.head_dim * self.dtype.itemsize

    def rope(self, length: int) -> Rope:
        r = self._rope
        if r is None or r.cos.shape[0] < length or r.cos.device != self.device or r.cos.dtype != self.dtype:
            r = self._rope = Rope(self.cfg.head_dim, self.cfg.rope_theta, max(length, 1024), self.dtype, self.device)
        return r

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, with image placeholder slots filled (row by row, in reading order)
        by the projected image tokens, as the official `prepare_inputs_embeds` does."""
        emb = self.embed_tokens(input_ids)
        if image_tokens is not None:
            slots = input_ids == self.placeholder_id
            if int(slots.sum()) != image_tokens.shape[0]:
                from .errors import SettingsError
                raise SettingsError(f"The prompt has {int(slots.sum())} image placeholder slots but "
                                    f"{image_tokens.shape[0]} image tokens were given.")
            emb[slots] = self.image_in_projector(image_tokens.to(emb.dtype)).to(emb.dtype)
        return emb

    def _run(self, embeds: torch.Tensor, cache: StaticKVCache, kv_len: int | None) -> torch.Tensor:
        """Run `embeds` [batch, n, hidden] at cache positions length..length+n-1 (positions are cache
        positions for every row, pads included, as in the official code); returns final-norm hidden
        states. `kv_len=None` attends over the whole preallocated cache (bit-equal to the official
        static-cache path); otherwise only the filled prefix is attended (faster, same maths)."""
        start, n = cache.length, embeds.shape[1]
        kv = cache.max_len if kv_len is None else max(kv_len, start + n)
        mask = cache.additive_mask(start, n, kv)
        cos, sin = self.rope(cache.max_len).slice(start, n)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, start, mask, kv)
        cache.length = start + n
        return self.norm(x)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache: StaticKVCache,
                kv_len: int | None = None) -> torch.Tensor:
        """Append a (left-padded) block; `attention_mask` [batch, n] marks real tokens with 1."""
        start, n = cache.length, embeds.shape[1]
        cache.valid[:, start:start + n] = attention_mask.to(torch.bool)
        return self._run(embeds, cache, kv_len)

    def step(self, embeds: torch.Tensor, cache: StaticKVCache, kv_len: int | None = None,
             valid: torch.Tensor | None = None) -> torch.Tensor:
        """One new position for every row; `valid` [rows] (default all) says which rows really hold
        a token there (a row that already finished its reasoning gets a masked slot)."""
        cache.valid[:, cache.length:cache.length + embeds.shape[1]] = True if valid is None else valid[:, None]
        return self._run(embeds, cache, kv_len)

    def step_at(self, embeds: torch.Tensor, cache: StaticKVCache, pos: torch.Tensor) -> torch.Tensor:
        """`step` for one position held in a 1-element device tensor: attends the whole cache with a
        mask computed on the device (bit-equal to `step(..., kv_len=None)`), and leaves
        `cache.length` alone (the caller tracks it); nothing here reads back to the host."""
        cache.valid.index_fill_(1, pos, True)
        slots = torch.arange(cache.max_len, device=pos.device)
        allowed = cache.valid & (slots <= pos)[None]
        mask = torch.zeros(allowed.shape, dtype=cache.dtype, device=pos.device)
        mask.masked_fill_(~allowed, torch.finfo(cache.dtype).min)
        mask = mask[:, None, None]
        rope = self.rope(cache.max_len)
        cos = rope.cos.index_select(0, pos)[None, None]
        sin = rope.sin.index_select(0, pos)[None, None]
        x = embeds
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            x = x + layer.self_attn.forward_at(h, cos, sin, cache, i, pos, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            from .errors import SettingsError
            raise SettingsError("Text generation needs the LM head: load the backbone with the LM head enabled.")
        return self.lm_head(hidden)
