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
from .devices import RunsOn, free_bytes
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


def pads_attention(device: torch.device) -> bool:
    """Whether attended lengths are rounded up to a multiple of 16 (the fast path only; the spare
    slots are masked). On CUDA, SDPA picks its kernel by alignment among other things: a length
    that moves by one per token would switch kernels (and pad the mask by a copy) from call to
    call. The parity path (`kv_len=None`) attends exactly what the reference attends."""
    return device.type == "cuda"


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
        # sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * sin_signed,
        # bit for bit (a negation is exact), without the negation and cat per call
        half = head_dim // 2
        self.sin_signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)

    def slice(self, start: int, count: int):
        return self.cos[start:start + count][None, None], self.sin[start:start + count][None, None]

    def signed_slice(self, start: int, count: int):
        return self.cos[start:start + count][None, None], self.sin_signed[start:start + count][None, None]


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] over the last dim: one copy (a flip of a [2, half] view)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


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

    def _apply(self, fn, recurse=True):
        # the fused layout holds the joined weights where they were: a move must not leave it behind
        self.__dict__.pop("_qkv", None)
        return super()._apply(fn, recurse)

    def fused_qkv(self):
        """q|k|v as one product (see fused.py); rebuilt if the projections were replaced."""
        f = getattr(self, "_qkv", None)
        if f is None or f.mods[0] is not self.q_proj or f.mods[1] is not self.k_proj or f.mods[2] is not self.v_proj:
            from .fused import fused_linear
            f = self._qkv = fused_linear([self.q_proj, self.k_proj, self.v_proj])
        return f

    def decode(self, x, cos, sin_signed, cache: StaticKVCache, layer: int, write, mask, kv_len, fused: bool):
        """The fast path for one new position: one q|k|v product, RoPE on q and k together, and
        for attention the query heads of each KV group folded into the query length (q_len 1
        -> q_len = group size), so SDPA needs no GQA support and the [B,1,1,L] mask simply
        broadcasts. `write` is the position: an int, or a 1-element device tensor (captured
        step). Returns the attention output before o_proj. Same maths as `forward`; only rounding moves."""
        b = x.shape[0]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        f = self.fused_qkv() if fused else None
        if f is not None:
            y = f(x)
        else:
            y = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        y = y.view(b, nh + 2 * nkv, 1, hd)  # one position: [b, 1, heads, hd] and [b, heads, 1, hd] share memory
        qk = y[:, :nh + nkv]
        qk = torch.addcmul(qk * cos, swap_halves(qk), sin_signed)
        q, k, v = qk[:, :nh], qk[:, nh:], y[:, nh + nkv:]
        if isinstance(write, torch.Tensor):
            cache.keys[layer].index_copy_(2, write, k)
            cache.values[layer].index_copy_(2, write, v)
            keys, values = cache.keys[layer], cache.values[layer]
        else:
            cache.keys[layer][:, :, write:write + 1] = k
            cache.values[layer][:, :, write:write + 1] = v
            keys, values = cache.keys[layer][:, :, :kv_len], cache.values[layer][:, :, :kv_len]
        out = F.scaled_dot_product_attention(q.reshape(b, nkv, nh // nkv, hd), keys, values, attn_mask=mask)
        return out.reshape(b, 1, nh * hd)


class MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig, ops=nn):
        super().__init__()
        self.gate_proj = ops.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = ops.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = ops.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_gate_up", None)  # as Attention._apply
        return super()._apply(fn, recurse)

    def fused_gate_up(self):
        f = getattr(self, "_gate_up", None)
        if f is None or f.mods[0] is not self.gate_proj or f.mods[1] is not self.up_proj:
            from .fused import fused_linear
            f = self._gate_up = fused_linear([self.gate_proj, self.up_proj])
        return f

    def decode(self, residual, x, fused: bool):
        """residual + MLP(x) with gate|up as one product and the residual added in the last GEMM."""
        from .fused import linear_add
        f = self.fused_gate_up() if fused else None
        if f is not None:
            gate, up = f.split(f(x))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return linear_add(residual, self.down_proj, F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig, ops=nn):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, cos, sin, cache, layer, start, mask, kv_len, fast: bool = False, fused: bool = True):
        """`fast` (one position, sin given as `Rope.sin_signed`): the fused decode path."""
        if fast:
            return self.decode(x, cos, sin, cache, layer, start, mask, kv_len, fused)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, start, mask, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin_signed, cache, layer, write, mask, kv_len, fused: bool):
        from .fused import linear_add
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        h = F.rms_norm(x, x.shape[-1:], n1.weight, n1.eps)
        attn = self.self_attn
        x = linear_add(x, attn.o_proj, attn.decode(h, cos, sin_signed, cache, layer, write, mask, kv_len, fused))
        return self.mlp.decode(x, F.rms_norm(x, x.shape[-1:], n2.weight, n2.eps), fused)


class Backbone(RunsOn, nn.Module):
    """State-dict names match the official checkpoints (no `model.` prefix).

    `ops` supplies Linear and Embedding (a host's own, such as ComfyUI's comfy.ops); its Linear is kept
    so that the LM head, read later, is built the same way. `layer_runner`, when a host sets it, runs
    the decoder layers: `layer_runner(layers, body)` must call `body(i, layer)` for each in order
    (ComfyUI's prefetch queue uses it to fetch the next layer's weights while one computes)."""

    def __init__(self, cfg: BackboneConfig, with_lm_head: bool = False, ops=nn, placeholder_id: int = -1):
        super().__init__()
        self.cfg = cfg
        self.placeholder_id = placeholder_id
        self.source = ""  # the folder the weights came from, for reading the LM head later
        self.streamer = None  # set by weights.streaming.stream_layers when layers stream from RAM
        self.linear_class = ops.Linear  # a class, not the module: the backbone stays deep-copyable
        self.layer_runner = None
        self.paged = False  # a host may move the weights between calls: no whole-step CUDA graph
        self.embed_tokens = ops.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.image_in_projector = ops.Linear(cfg.token_dim, cfg.hidden_size)
        self.image_out_projector = ops.Linear(cfg.hidden_size, cfg.hidden_size)
        self.lm_head = ops.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if with_lm_head else None
        self._rope: Rope | None = None

    def weights_device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def run_layers(self, body) -> None:
        if self.layer_runner is None:
            for i, layer in enumerate(self.layers):
                body(i, layer)
        else:
            self.layer_runner(self.layers, body)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def _apply(self, fn, recurse=True):
        """After a move or cast, nothing of ours stays where the weights were: the RoPE table and a
        kept CUDA graph capture (with its own KV cache) go with it, unless the move changed nothing."""
        out = super()._apply(fn, recurse)
        r = self._rope
        if r is not None and (r.cos.device != self.device or r.cos.dtype != self.dtype):
            self._rope = None
        from .graphs import release_if_moved
        release_if_moved(self)
        return out

    def new_cache(self, batch: int, max_len: int) -> StaticKVCache:
        if max_len > self.cfg.max_position_embeddings:
            from .errors import SettingsError
            raise SettingsError(
                f"This run needs {max_len} positions but the model supports {self.cfg.max_position_embeddings}: "
                "use a smaller size or a shorter prompt/story.")
        need = self.cache_bytes(batch, max_len)
        if self.device.type == "cuda":
            free = free_bytes(self.device)
            if need > free:
                from .errors import NextStepError
                raise NextStepError(
                    f"This run needs {need / 2**30:.2f} GiB of GPU memory for its KV cache ({batch} rows x {max_len} "
                    f"positions) but only {free / 2**30:.2f} GiB is free. Use a smaller size, batch or story, "
                    "or free VRAM.")
        return StaticKVCache(self.cfg.num_layers, batch, self.cfg.num_kv_heads, max_len, self.cfg.head_dim,
                             self.dtype, self.device)

    def padded_cache_len(self, positions: int, exact: bool) -> int:
        """Cache slots for `positions`: exactly that many on the parity path (the attended length
        moves its rounding), else rounded up to a multiple of 16, the row alignment SDPA's fused
        kernels want for the mask of the whole-cache (captured) step; the spare slots stay masked."""
        if exact or positions > self.cfg.max_position_embeddings:
            return positions
        return min(-(-positions // 16) * 16, self.cfg.max_position_embeddings)

    def cache_bytes(self, batch: int, max_len: int) -> int:
        """Keys + values for every layer, in the model dtype: what a run needs beyond the weights."""
        c = self.cfg
        return 2 * c.num_layers * batch * c.num_kv_heads * max_len * c.head_dim * self.dtype.itemsize

    def rope(self, length: int) -> Rope:
        r = self._rope
        if r is None or r.cos.shape[0] < length or r.cos.device != self.device or r.cos.dtype != self.dtype:
            r = self._rope = Rope(self.cfg.head_dim, self.cfg.rope_theta, max(length, 1024), self.dtype, self.device)
        return r

    def rope_built(self, length: int) -> Rope:
        """The table a captured step reads. Building it copies from the host, which a CUDA graph
        capture cannot do (capture would fail and the run silently fall back to eager), so
        `graphed_loop` builds it before capturing and here a rebuild during capture is an error."""
        r = self._rope
        if r is None or r.cos.shape[0] < length or r.cos.device != self.device or r.cos.dtype != self.dtype:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the RoPE table must be built before CUDA graph capture (Backbone.rope)")
            r = self.rope(length)
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

    def _run(self, embeds: torch.Tensor, cache: StaticKVCache, kv_len: int | None, fast: bool = False) -> torch.Tensor:
        """Run `embeds` [batch, n, hidden] at cache positions length..length+n-1 (positions are cache
        positions for every row, pads included, as in the official code); returns final-norm hidden
        states. `kv_len=None` attends over the whole preallocated cache (bit-equal to the official
        static-cache path); otherwise only the filled prefix is attended (faster, same maths).
        `fast` (one position only) takes the fused decode path of `DecoderLayer.decode`."""
        start, n = cache.length, embeds.shape[1]
        fast = fast and n == 1
        kv = cache.max_len if kv_len is None else max(kv_len, start + n)
        if kv_len is not None and pads_attention(embeds.device):
            kv = min(-(-kv // 16) * 16, cache.max_len)
        mask = cache.additive_mask(start, n, kv)
        rope = self.rope(cache.max_len)
        cos, sin = rope.signed_slice(start, n) if fast else rope.slice(start, n)
        fused = self.streamer is None  # streamed layers get their weights swapped in per call
        x = embeds

        def body(i, layer):
            nonlocal x
            x = layer(x, cos, sin, cache, i, start, mask, kv, fast, fused)

        self.run_layers(body)
        cache.length = start + n
        if fast:
            return F.rms_norm(x, x.shape[-1:], self.norm.weight, self.norm.eps)
        return self.norm(x)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache: StaticKVCache,
                kv_len: int | None = None) -> torch.Tensor:
        """Append a (left-padded) block; `attention_mask` [batch, n] marks real tokens with 1."""
        start, n = cache.length, embeds.shape[1]
        cache.valid[:, start:start + n] = attention_mask.to(torch.bool)
        return self._run(embeds, cache, kv_len)

    def step(self, embeds: torch.Tensor, cache: StaticKVCache, kv_len: int | None = None,
             valid: torch.Tensor | None = None, fast: bool = False) -> torch.Tensor:
        """One new position for every row; `valid` [rows] (default all) says which rows really hold
        a token there (a row that already finished its reasoning gets a masked slot). `fast`: the
        fused decode path (same maths, different rounding; never for bit parity)."""
        cache.valid[:, cache.length:cache.length + embeds.shape[1]] = True if valid is None else valid[:, None]
        return self._run(embeds, cache, kv_len, fast)

    def step_at(self, embeds: torch.Tensor, cache: StaticKVCache, pos: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """`step` for one position held in a 1-element device tensor: attends the whole cache with a
        mask computed on the device (bit-equal to `step(..., kv_len=None)` unless `fast`), and leaves
        `cache.length` alone (the caller tracks it); nothing here reads back to the host."""
        cache.valid.index_fill_(1, pos, True)
        slots = torch.arange(cache.max_len, device=pos.device)
        allowed = cache.valid & (slots <= pos)[None]
        mask = torch.zeros(allowed.shape, dtype=cache.dtype, device=pos.device)
        mask.masked_fill_(~allowed, torch.finfo(cache.dtype).min)
        mask = mask[:, None, None]
        rope = self.rope_built(cache.max_len)
        cos = rope.cos.index_select(0, pos)[None, None]
        x = embeds
        sin = (rope.sin_signed if fast else rope.sin).index_select(0, pos)[None, None]

        def body(i, layer):
            nonlocal x
            if fast:
                x = layer.decode(x, cos, sin, cache, i, pos, mask, None, True)
            else:
                h = layer.input_layernorm(x)
                x = x + layer.self_attn.forward_at(h, cos, sin, cache, i, pos, mask)
                x = x + layer.mlp(layer.post_attention_layernorm(x))

        self.run_layers(body)
        if fast:
            return F.rms_norm(x, x.shape[-1:], self.norm.weight, self.norm.eps)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            from .errors import SettingsError
            raise SettingsError("Text generation needs the LM head: load the backbone with the LM head enabled.")
        return self.lm_head(hidden)
