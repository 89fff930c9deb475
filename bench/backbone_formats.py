"""Backbone time per image token and bytes read per token with fp32 / bf16 / int8 / int4 decoder
weights, at the 14B model's layer shapes (hidden 5120, MLP 13824, GQA 40/8), on this machine.

    python bench/backbone_formats.py                   # 2 full-size layers on CPU, 2 CFG rows
    python bench/backbone_formats.py --layers 4 --device cuda

Decoding is bound by reading weights, so the figure to compare is ms per token against weight
bytes per token. Every decoder layer is the same, so a few full-size layers give the per-layer
cost; the table scales it to 48 layers. The KV cache holds 1536 positions (512 of prompt + a
512x512 image); each step attends all of them.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.backbone import Backbone  # noqa: E402
from nextstep_core.config import BackboneConfig  # noqa: E402
from nextstep_core.weights.convention import quantize_backbone  # noqa: E402


def layer_bytes(bb) -> int:
    return sum(t.numel() * t.element_size() for n, t in bb.state_dict().items() if n.startswith("layers.0."))


def step_ms(bb, rows: int, positions: int, reps: int) -> float:
    cache = bb.new_cache(rows, positions + reps + 2)
    cache.length = positions
    cache.valid[:, :positions] = True
    x = torch.randn(rows, 1, bb.cfg.hidden_size, dtype=bb.dtype, device=bb.device)
    with torch.inference_mode():
        bb.step(x, cache)  # warm-up (kernels, layouts)
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            bb.step(x, cache)
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--mlp", type=int, default=13824)
    ap.add_argument("--rows", type=int, default=2, help="CFG rows decoded together")
    ap.add_argument("--positions", type=int, default=1536)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default="fp32,bf16,int8,int4")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    heads = args.hidden // 128
    cfg = BackboneConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                         num_kv_heads=max(1, heads // 5), head_dim=128, intermediate_size=args.mlp, vocab_size=256)
    print(f"{args.layers} layers of hidden {args.hidden}, MLP {args.mlp}, {heads}/{cfg.num_kv_heads} heads; "
          f"{args.rows} rows, {args.positions} cached positions; {args.device}, {args.threads} threads, torch "
          f"{torch.__version__}, {platform.machine()}\n")
    print("| decoder weights | compute dtype | ms per token per layer | x48 layers, ms | weight MB per layer | "
          "GB read per token (48 layers + KV) |")
    print("|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        torch.manual_seed(0)
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
        bb = Backbone(cfg).to(dtype)
        for p in bb.parameters():
            p.data.normal_(0, 0.5 / p.shape[-1] ** 0.5)
        if fmt in ("int8", "int4"):
            quantize_backbone(bb, fmt)
        bb = bb.to(args.device).eval()
        per = step_ms(bb, args.rows, args.positions, args.reps) / args.layers
        lb = layer_bytes(bb)
        kv = bb.cache_bytes(args.rows, args.positions) / args.layers
        print(f"| {fmt} | {str(dtype).replace('torch.', '')} | {per:.1f} | {per * 48:.0f} | {lb / 1e6:.0f} | "
              f"{48 * (lb + kv) / 1e9:.2f} |")
        del bb


if __name__ == "__main__":
    main()
