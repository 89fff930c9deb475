"""GPU benchmark: a full-size-shaped NextStep (random weights, 48 layers, hidden 5120, flow head
1536 x 12: the real shapes, so the real cost) generating one 512x512 image with CFG.

    python bench/gpu_token_loop.py                      # bf16, eager vs CUDA graphs
    python bench/gpu_token_loop.py --quant fp8          # 8-bit backbone weights (needs nextstep_core.quant)
    python bench/gpu_token_loop.py --small --device cpu # the same script on a toy config, to check it runs

Prints seconds per image, ms per token, peak VRAM and the bandwidth floor from
shared perf notes: per token the backbone reads all its weights once (bf16 ~26.4 GB without
embeddings/LM head), so at H200's ~4.8 TB/s the floor is ~5.5 ms/token before the flow head.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.backbone import Backbone  # noqa: E402
from nextstep_core.config import BackboneConfig, FlowHeadConfig  # noqa: E402
from nextstep_core.engine import SamplingSettings, TokenLoop, noise_for  # noqa: E402
from nextstep_core.flow_head import FlowHead  # noqa: E402
from nextstep_core.noise import make_generator  # noqa: E402

FULL = dict(hidden=5120, layers=48, heads=40, kv=8, mlp=13824, head_width=1536, head_layers=12, vocab=152064)
SMALL = dict(hidden=256, layers=4, heads=8, kv=2, mlp=512, head_width=256, head_layers=2, vocab=1024)


def build(shape, device, dtype, quant):
    cfg = BackboneConfig(hidden_size=shape["hidden"], num_layers=shape["layers"], num_heads=shape["heads"],
                         num_kv_heads=shape["kv"], head_dim=shape["hidden"] // shape["heads"],
                         intermediate_size=shape["mlp"], vocab_size=shape["vocab"], rms_norm_eps=1e-6, rope_theta=1e6)
    with torch.device("meta"):
        bb = Backbone(cfg)
        head = FlowHead(FlowHeadConfig(64, shape["hidden"], shape["head_width"], shape["head_layers"]))
    for m in (bb, head):
        m.to_empty(device=device)
        for p in m.parameters():
            p.data = (torch.randn(p.shape, device=device, dtype=torch.float32) * (0.5 / p.shape[-1] ** 0.5)).to(dtype)
    if quant:
        from nextstep_core.quant import quantize_backbone
        quantize_backbone(bb, quant)
    return bb.eval(), head.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_image(bb, head, device, n_tokens, steps, graphs):
    s = SamplingSettings(cfg=7.5, steps=steps, cuda_graphs=graphs)
    ids = torch.randint(0, 1000, (2, 64), device=device)
    sync(device)
    t0 = time.perf_counter()
    cache = bb.new_cache(2, ids.shape[1] + n_tokens)
    hidden = bb.prefill(bb.embed(ids), torch.ones_like(ids), cache, ids.shape[1])[:, -1]
    noise = noise_for(s, make_generator(0), 1, 1, 64, device, n_tokens)
    TokenLoop(bb, head, s).run(hidden, cache, 2, n_tokens, noise)
    sync(device)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", choices=["int8", "fp8"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--small", action="store_true", help="toy shapes (check the script, not the GPU)")
    ap.add_argument("--modes", default="off,on", help="cuda_graphs modes to time, in order")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = SMALL if args.small else FULL
    with torch.inference_mode():
        bb, head = build(shape, device, dtype, args.quant)
        n = (args.size // 16) ** 2
        weights = sum(p.numel() * p.element_size() for n_, p in bb.named_parameters() if "embed" not in n_)
        weights += sum(b.numel() * b.element_size() for b in bb.buffers())
        print(f"{'full' if not args.small else 'small'} shapes, {args.dtype}{' + ' + args.quant if args.quant else ''}, "
              f"{args.size}x{args.size} ({n} tokens), {args.steps} steps, cfg 7.5, device {device}"
              f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}")
        print(f"backbone weights read per token: {weights / 1e9:.2f} GB")
        print("| cuda graphs | s/image | ms/token | peak VRAM GB |")
        print("|---|---|---|---|")
        for mode in args.modes.split(","):
            one_image(bb, head, device, 8, args.steps, mode)  # warm-up (and capture)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sec = one_image(bb, head, device, n, args.steps, mode)
            peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
            print(f"| {mode} | {sec:.2f} | {sec / n * 1000:.2f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
