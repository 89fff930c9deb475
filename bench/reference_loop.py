"""A straightforward token loop, written the way the official pipeline runs: the KV cache and
attention mask grow by concatenation, and the flow head evaluates its whole network (time
embedding, condition embedding, every adaLN) at every one of its N steps. Same weights, same
noise and maths as the engine; it exists only as the baseline the benchmark's ratio is against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nextstep_core.samplers import combine_cfg, get_sampler, sde_step


def _attn_layer(layer, x, past, mask2d, pos):
    a = layer.self_attn
    b, n, _ = x.shape
    h = layer.input_layernorm(x)
    q = a.q_proj(h).view(b, n, a.num_heads, a.head_dim).transpose(1, 2)
    k = a.k_proj(h).view(b, n, a.num_kv_heads, a.head_dim).transpose(1, 2)
    v = a.v_proj(h).view(b, n, a.num_kv_heads, a.head_dim).transpose(1, 2)
    cos, sin = pos
    rot = lambda t: torch.cat((-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]), -1)
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    rep = a.num_heads // a.num_kv_heads
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    total = kk.shape[2]
    causal = torch.ones(n, total, dtype=torch.bool).tril(total - n)
    allowed = causal[None, None] & mask2d[:, None, None, :].bool()
    o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
    x = x + a.o_proj(o.transpose(1, 2).reshape(b, n, -1))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, (k, v)


def forward(bb, embeds, past, mask2d):
    start = 0 if past is None else past[0][0].shape[2]
    n = embeds.shape[1]
    inv = 1.0 / (bb.cfg.rope_theta ** (torch.arange(0, bb.cfg.head_dim, 2).float() / bb.cfg.head_dim))
    freqs = torch.arange(start, start + n).float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    pos = (emb.cos()[None, None].to(embeds.dtype), emb.sin()[None, None].to(embeds.dtype))
    x, new = embeds, []
    for i, layer in enumerate(bb.layers):
        x, kv = _attn_layer(layer, x, None if past is None else past[i], mask2d, pos)
        new.append(kv)
    return bb.norm(x), new


def sample_tokens(bb, head, input_ids, attention_mask, cfg_mult, n_tokens, steps, cfg, shift, gen, timers):
    """The plain loop; `timers` collects seconds spent in 'backbone' and 'head'."""
    import time
    rows = input_ids.shape[0]
    batch = rows // cfg_mult
    tick = time.perf_counter
    t0 = tick()
    hidden, past = forward(bb, bb.embed(input_ids), None, attention_mask)
    timers["prefill"] += tick() - t0
    c = hidden[:, -1]
    mask = attention_mask
    t = get_sampler("nextstep1").time_grid(steps, shift)
    tokens = []
    for k in range(n_tokens):
        t0 = tick()
        cond = bb.image_out_projector(c)
        x = torch.randn(1, 64, generator=gen).repeat(batch, 1)
        for i in range(steps):
            v = head.net(x.repeat(cfg_mult, 1), t[i].expand(rows), cond)
            v = combine_cfg(v, cfg_mult, cfg, 1.0)
            if i < steps - 1:
                x = sde_step(x, v, t[i], t[i + 1] - t[i], torch.randn(1, 64, generator=gen).repeat(batch, 1))
            else:
                x = x + v * 0.04
        tokens.append(x)
        t1 = tick()
        timers["head"] += t1 - t0
        e = bb.image_in_projector(x).repeat(cfg_mult, 1)[:, None]
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        hidden, past = forward(bb, e, past, mask)
        c = hidden[:, -1]
        timers["backbone"] += tick() - t1
    return torch.stack(tokens, 1)
