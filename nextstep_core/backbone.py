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
from .fused import fused_linear, linear_add
from .kv_cache import StaticKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """`fast`: one `rms_norm` kernel (rounding may move); else the reference's float32 steps."""
        if fast:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
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

    def at(self, pos, count: int, signed: bool):
        """cos and sin [1, 1, count, head_dim] for positions pos..pos+count-1; `pos` an int, or a
        1-element device tensor (read on the device); `signed`: the sine table for `swap_halves`."""
        sin = self.sin_signed if signed else self.sin
        if isinstance(pos, torch.Tensor):
            return self.cos.index_select(0, pos)[None, None], sin.index_select(0, pos)[None, None]
        return self.cos[pos:pos + count][None, None], sin[pos:pos + count][None, None]


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] over the last dim: one copy, one op (a roll by half the width)."""
    return x.roll(x.shape[-1] // 2, -1)


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig, ops=nn):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = ops.Linear(h, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = ops.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = ops.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = ops.Linear(cfg.num_heads * cfg.head_dim, h, bias=cfg.o_bias)

    def forward(self, x, cos, sin, cache: StaticKVCache, layer: int, pos, mask, kv_len, fast: bool = False,
                fused: bool = True):
        """Attention for queries at positions pos..pos+n-1, returned before o_proj. `pos` is an int,
        or for one position a 1-element device tensor (static shapes and addresses: the step can be
        captured in a CUDA graph); see `StaticKVCache.update` for what is attended.

        `fast` (one position, x [b, hidden] and the result [b, heads * head_dim]; `sin` from the
        signed table): one q|k|v product (`fused`), RoPE on q and k together, and the query heads of
        each KV group folded into the query length (q_len 1 -> group size), so SDPA needs no GQA
        support and the [B,1,1,L] mask simply broadcasts. Same maths as the reference's operations
        used otherwise; only rounding moves."""
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if fast:
            b = x.shape[0]
            f = self.fused_qkv() if fused else None
            y = f(x) if f is not None else torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
            y = y.view(b, nh + 2 * nkv, 1, hd)  # one position: [b, 1, heads, hd] and [b, heads, 1, hd] share memory
            qk, v = y.split([nh + nkv, nkv], dim=1)
            qk = torch.addcmul(qk * cos, swap_halves(qk), sin)
            q, k = qk.split([nh, nkv], dim=1)
        else:
            b, n, _ = x.shape
            q = self.q_proj(x).view(b, n, nh, hd).transpose(1, 2)
            k = self.k_proj(x).view(b, n, nkv, hd).transpose(1, 2)
            v = self.v_proj(x).view(b, n, nkv, hd).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        keys, values = cache.update(layer, pos, k, v, kv_len)
        if fast:
            out = F.scaled_dot_product_attention(q.reshape(b, nkv, nh // nkv, hd), keys, values, attn_mask=mask)
            return out.reshape(b, nh * hd)
        return attend(q, keys, values, mask).transpose(1, 2).reshape(b, n, -1)

    def _apply(self, fn, recurse=True):
        # the fused layout holds the joined weights where they were: a move must not leave it behind
        self.__dict__.pop("_qkv", None)
        return super()._apply(fn, recurse)

    def fused_qkv(self):
        """q|k|v as one product (see fused.py); rebuilt if the projections were replaced."""
        f = getattr(self, "_qkv", None)
        if f is None or f.mods[0] is not self.q_proj or f.mods[1] is not self.k_proj or f.mods[2] is not self.v_proj:
            f = self._qkv = fused_linear([self.q_proj, self.k_proj, self.v_proj])
        return f


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
            f = self._gate_up = fused_linear([self.gate_proj, self.up_proj])
        return f

    def decode(self, residual, x, fused: bool):
        """residual + MLP(x) with gate|up as one product and the residual added in the last GEMM."""
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

    def forward(self, x, cos, sin, cache, layer, pos, mask, kv_len, fast: bool = False, fused: bool = True):
        """`fast` (one position, x [b, hidden]): the fused step, with the residual additions riding in
        the o_proj and down_proj products; otherwise the reference's operations, bit for bit."""
        attn = self.self_attn
        h = attn(self.input_layernorm(x, fast), cos, sin, cache, layer, pos, mask, kv_len, fast, fused)
        if not fast:
            x = x + attn.o_proj(h)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = linear_add(x, attn.o_proj, h)
        return self.mlp.decode(x, self.post_attention_layernorm(x, fast), fused)


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

    def _run(self, embeds: torch.Tensor, cache: StaticKVCache, pos, kv_len: int | None, fast: bool) -> torch.Tensor:
        """Run `embeds` [batch, n, hidden] at cache positions pos..pos+n-1 (cache positions for every
        row, pads included, as in the official code); returns final-norm hidden states. `pos` is
        `cache.length`, or for one position a 1-element device tensor (the captured step: the whole
        cache attended under a mask made on the device, nothing read back, `cache.length` left to
        the caller). `kv_len=None` attends the whole preallocated cache (bit-equal to the official
        static-cache path); otherwise only the filled prefix (faster, same maths). `fast` (one
        position only): the fused step of `DecoderLayer`, never for bit parity."""
        n = embeds.shape[1]
        fast = fast and n == 1
        kv = cache.max_len
        if kv_len is not None and not isinstance(pos, torch.Tensor):
            kv = max(kv_len, pos + n)
            if pads_attention(embeds.device):
                kv = min(-(-kv // 16) * 16, cache.max_len)
        mask = cache.additive_mask(pos, n, kv)
        cos, sin = self.rope_built(cache.max_len).at(pos, n, fast)
        fused = self.streamer is None  # streamed layers get their weights swapped in per call
        x = embeds[:, 0] if fast else embeds  # the fast step runs [rows, hidden]: no reshapes around its products

        def body(i, layer):
            nonlocal x
            x = layer(x, cos, sin, cache, i, pos, mask, kv, fast, fused)

        self.run_layers(body)
        if not isinstance(pos, torch.Tensor):
            cache.length = pos + n
        h = self.norm(x, fast)
        return h[:, None] if fast else h

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, cache: StaticKVCache,
                kv_len: int | None = None) -> torch.Tensor:
        """Append a (left-padded) block; `attention_mask` [batch, n] marks real tokens with 1."""
        start, n = cache.length, embeds.shape[1]
        cache.valid[:, start:start + n] = attention_mask.to(torch.bool)
        return self._run(embeds, cache, start, kv_len, False)

    def step(self, embeds: torch.Tensor, cache: StaticKVCache, kv_len: int | None = None,
             valid: torch.Tensor | None = None, fast: bool = False) -> torch.Tensor:
        """One new position for every row; `valid` [rows] (default all) says which rows really hold
        a token there (a row that already finished its reasoning gets a masked slot). `fast`: the
        fused decode path (same maths, different rounding; never for bit parity)."""
        cache.valid[:, cache.length:cache.length + embeds.shape[1]] = True if valid is None else valid[:, None]
        return self._run(embeds, cache, cache.length, kv_len, fast)

    def step_at(self, embeds: torch.Tensor, cache: StaticKVCache, pos: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """`step` for one position held in a 1-element device tensor (bit-equal to
        `step(..., kv_len=None)` unless `fast`); the caller tracks `cache.length`."""
        cache.valid.index_fill_(1, pos, True)
        return self._run(embeds, cache, pos, None, fast)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            from .errors import SettingsError
            raise SettingsError("Text generation needs the LM head: load the backbone with the LM head enabled.")
        return self.lm_head(hidden)
