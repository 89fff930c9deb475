"""A preallocated key/value cache sized for exactly prompt + image tokens.

Static shapes (and fixed addresses) are what let the decode step be captured later; the
additive mask uses `finfo.min` like the official StaticCache path so even the rounding of
attention matches when every slot is attended.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # True where a slot holds a real (non-padding) token; the pad slots of left padding stay False.
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far; host-side bookkeeping only, never read from the device
        self.max_len = max_len
        self.dtype = dtype

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def additive_mask(self, start, count: int, kv_len: int) -> torch.Tensor:
        """[batch, 1, count, kv_len] mask for queries at positions start..start+count-1 (`start` an
        int, or for one query a 1-element device tensor)."""
        if isinstance(start, torch.Tensor):
            q_pos = start
        else:
            q_pos = torch.arange(start, start + count, device=self.valid.device)
        k_pos = torch.arange(kv_len, device=self.valid.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None] & self.valid[:, None, :kv_len]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.valid.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    def update(self, layer: int, pos, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v [batch, kv_heads, n, head_dim] at slots pos..pos+n-1 and return the keys and
        values to attend: the first `kv_len` slots, or for a 1-element device tensor `pos` (written
        on the device, no host sync) the whole cache."""
        keys, values = self.keys[layer], self.values[layer]
        if isinstance(pos, torch.Tensor):
            keys.index_copy_(2, pos, k)
            values.index_copy_(2, pos, v)
            return keys, values
        keys[:, :, pos:pos + k.shape[2]] = k
        values[:, :, pos:pos + k.shape[2]] = v
        return keys[:, :, :kv_len], values[:, :, :kv_len]

    def rows(self, start: int, stop: int) -> "StaticKVCache":
        """A cache over rows start..stop-1 that shares storage with this one (writes go through);
        used to run the conditional rows alone while they reason, before the others join."""
        other = StaticKVCache.__new__(StaticKVCache)
        other.keys = [k[start:stop] for k in self.keys]
        other.values = [v[start:stop] for v in self.values]
        other.valid = self.valid[start:stop]
        other.length, other.max_len, other.dtype = self.length, self.max_len, self.dtype
        return other

    def grown(self, max_len: int, device=None) -> "StaticKVCache":
        """A deep copy with room for `max_len` positions (on `device`, default where it is), so two
        continuations of one context (storyboard branches) can never overwrite each other."""
        other = StaticKVCache.__new__(StaticKVCache)
        n = self.length
        device = self.valid.device if device is None else device

        def copy(t):
            out = torch.zeros(t.shape[:2] + (max_len,) + t.shape[3:], dtype=t.dtype, device=device)
            out[:, :, :n] = t[:, :, :n]
            return out
        other.keys = [copy(k) for k in self.keys]
        other.values = [copy(v) for v in self.values]
        other.valid = torch.zeros(self.valid.shape[0], max_len, dtype=torch.bool, device=device)
        other.valid[:, :n] = self.valid[:, :n]
        other.length, other.max_len, other.dtype = n, max_len, self.dtype
        return other

    def offloaded(self) -> "StaticKVCache":
        """The filled part moved to CPU RAM: a story context waiting between two panel nodes should
        not hold VRAM that other models may need."""
        return self.grown(self.length, "cpu")
