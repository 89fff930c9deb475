"""GPU benchmark of the token step at NextStep-1's real shapes (random weights: 48 layers, hidden
5120, GQA 40/8, MLP 13824; flow head 1536 x 12), 512x512 with CFG (2 rows), 28 steps.

    python bench/gpu_token_loop.py                            # bf16, int8, fp8 in turn (a few minutes on an H200)
    python bench/gpu_token_loop.py --formats full --eager     # also time a whole image without CUDA graphs
    python bench/gpu_token_loop.py --small --device cpu --dtype float32   # toy shapes: checks the script runs

For each weight format it prints: the SDPA backend picked at the decode shapes (the exact path's
GQA call and the fast path's folded call), the per-token time of the backbone step, of the head's
N steps and of the whole step (eager and replayed as a CUDA graph; CUDA events), kernels per token
from the profiler (aten ops without views on CPU), the capture time and the time to reuse a kept
capture, seconds per 512x512 image, and the bandwidth floor: the bytes every token must read
(backbone matrices once, flow head x-path once per step, adaLN weights once) over --bandwidth.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_ops import OpCounter  # noqa: E402
from nextstep_core import graphs  # noqa: E402
from nextstep_core.backbone import Backbone  # noqa: E402
from nextstep_core.config import BackboneConfig, FlowHeadConfig  # noqa: E402
from nextstep_core.engine import Execution, SamplingSettings, TokenLoop, noise_for  # noqa: E402
from nextstep_core.flow_head import FlowHead  # noqa: E402
from nextstep_core.noise import make_generator  # noqa: E402

FULL = dict(hidden=5120, layers=48, heads=40, kv=8, mlp=13824, head_width=1536, head_layers=12, vocab=152064)
SMALL = dict(hidden=256, layers=4, heads=8, kv=2, mlp=512, head_width=256, head_layers=2, vocab=1024)
PROMPT = 64


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
        from nextstep_core.weights.convention import quantize_backbone
        quantize_backbone(bb, quant)
    return bb.eval(), head.eval()


class Clock:
    """CUDA events on a GPU (no host sync inside the timed region), perf_counter elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps: int) -> float:
        """ms per call."""
        fn()
        if self.cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1000 / reps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def kernels(fn, device) -> int:
    """Device kernels one call launches (CUDA profiler), or aten ops without views on CPU."""
    if device.type != "cuda":
        c = OpCounter()
        with c:
            fn()
        return c.kernels
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def sdpa_backends(bb, rows: int, cache_len: int, device, dtype) -> str:
    """torch._fused_sdp_choice at the decode shapes (0 math, 1 flash, 2 efficient, 3 cuDNN...)."""
    c = bb.cfg
    from torch.nn.attention import SDPBackend
    names = {int(v): k for k, v in SDPBackend.__members__.items()}
    k = torch.zeros(rows, c.num_kv_heads, cache_len, c.head_dim, device=device, dtype=dtype)
    mask = torch.zeros(rows, 1, 1, cache_len, device=device, dtype=dtype)
    out = []
    for label, q, gqa in (("exact (GQA)", torch.zeros(rows, c.num_heads, 1, c.head_dim, device=device, dtype=dtype), True),
                          ("fast (folded)", torch.zeros(rows, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim,
                                                        device=device, dtype=dtype), False)):
        try:
            kw = {"enable_gqa": True} if gqa else {}
            choice = int(torch._fused_sdp_choice(q, k, k, mask, 0.0, False, **kw))
            out.append(f"{label}: {names.get(choice, choice)}")
        except Exception as exc:  # a diagnostic: report, do not fail the benchmark
            out.append(f"{label}: ? ({type(exc).__name__})")
    return ", ".join(out)


def floor_bytes(bb, head, steps: int, rows: int, avg_ctx: int) -> float:
    """Bytes one token must read: decoder layers once, the head's x-path once per step, its
    adaLN/condition weights once, the output projector once, and the KV cache up to avg_ctx."""
    size = lambda mod: sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])
    layers = sum(size(layer) for layer in bb.layers)
    ada = sum(size(b.adaLN_modulation) for b in head.net.res_blocks) + size(head.net.final_layer.adaLN_modulation)
    once = ada + size(head.net.cond_embed) + size(bb.image_out_projector) + size(bb.image_in_projector)
    per_step = size(head.net) - ada - size(head.net.cond_embed) - size(head.net.time_embed)
    c = bb.cfg
    kv = 2 * c.num_layers * rows * c.num_kv_heads * avg_ctx * c.head_dim * bb.dtype.itemsize
    return layers + once + steps * per_step + kv


def one_image(bb, head, device, n_tokens, steps, mode) -> float:
    s = SamplingSettings(cfg=7.5, steps=steps)
    ids = torch.randint(0, 1000, (2, PROMPT), device=device)
    sync(device)
    t0 = time.perf_counter()
    cache = bb.new_cache(2, bb.padded_cache_len(PROMPT + n_tokens, False))
    hidden = bb.prefill(bb.embed(ids), torch.ones_like(ids), cache, PROMPT)[:, -1]
    noise = noise_for(s, make_generator(0), 1, 1, 64, device, n_tokens)
    TokenLoop(bb, head, s, Execution(cuda_graphs=mode)).run(hidden, cache, 2, n_tokens, noise)
    sync(device)
    return time.perf_counter() - t0


def measure(fmt, args, shape, device, dtype):
    quant = fmt if fmt in ("int8", "fp8") else None
    bb, head = build(shape, device, dtype, quant)
    fmt = fmt if quant else f"{args.dtype} weights"
    n = (args.size // 16) ** 2
    steps = args.steps
    cache_len = bb.padded_cache_len(PROMPT + n, False)
    print(f"\n### {fmt}")
    print(f"SDPA backend at decode shapes (2 rows x {cache_len} slots): {sdpa_backends(bb, 2, cache_len, device, dtype)}")
    s = SamplingSettings(cfg=7.5, steps=steps)
    ids = torch.randint(0, 1000, (2, PROMPT), device=device)
    cache = bb.new_cache(2, cache_len)
    hidden = bb.prefill(bb.embed(ids), torch.ones_like(ids), cache, PROMPT)[:, -1]
    loop = TokenLoop(bb, head, s)
    loop.schedule(2, n, device, 2)
    from nextstep_core.samplers import draws_per_token
    shape_z = (draws_per_token(s.sampler, steps), 1, 64)
    step = graphs.StaticStep(loop, hidden, cache, 2, shape_z)
    step.noise.normal_()
    step.scale.copy_(torch.tensor([7.5, 1.0]))
    clock = Clock(device)
    reps = args.reps
    tok = loop.sample_token(step.hidden, step.noise, step.scale, 2)
    e = bb.image_in_projector(tok).repeat(2, 1)[:, None]
    saved = step.pos.clone()

    def backbone():
        bb.step_at(e, step.cache, step.pos, fast=True)
    t_bb = clock(backbone, reps)
    t_head = clock(lambda: loop.sample_token(step.hidden, step.noise, step.scale, 2), reps)

    def eager():
        step.pos.copy_(saved)
        step.body()
    t_eager = clock(eager, reps)
    k_eager = kernels(eager, device)
    t_graph = k_graph = capture_s = reuse_s = float("nan")
    if device.type == "cuda":
        step.pos.copy_(saved)
        sync(device)
        t0 = time.perf_counter()
        kept = graphs.graphed_loop(loop, hidden, cache, 2, n)
        sync(device)
        capture_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = graphs.graphed_loop(loop, hidden, cache, 2, n)
        sync(device)
        reuse_s = time.perf_counter() - t0
        if kept is not None and again is kept and kept.graph is not None:
            t_graph = clock(lambda: (kept.pos.copy_(saved), kept.graph.replay()), reps)
            k_graph = kernels(lambda: kept.graph.replay(), device)
        graphs.release(bb)
    print("| part (per token) | ms | kernels |")
    print("|---|---|---|")
    print(f"| backbone step (fast) | {t_bb:.2f} | |")
    print(f"| flow head, {steps} steps + sampler | {t_head:.2f} | |")
    print(f"| whole step, eager | {t_eager:.2f} | {k_eager} |")
    print(f"| whole step, CUDA graph replay | {t_graph:.2f} | {k_graph} |")
    print(f"capture (warm-up + record + instantiate): {capture_s:.2f} s; reusing the kept capture: {reuse_s * 1000:.1f} ms")
    floor = floor_bytes(bb, head, steps, 2, PROMPT + n // 2)
    print(f"bytes per token {floor / 1e9:.2f} GB -> floor {floor / args.bandwidth / 1e9 * 1000:.2f} ms/token, "
          f"{floor / args.bandwidth / 1e9 * n:.2f} s/image at {args.bandwidth:.0f} GB/s")
    modes = (["auto"] if device.type == "cuda" else []) + (["off"] if args.eager or device.type != "cuda" else [])
    for mode in modes:
        graphed = mode == "auto"
        first = one_image(bb, head, device, n if graphed else 8, steps, mode)  # with graphs: the capture is made here
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = one_image(bb, head, device, n, steps, mode)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        label = "CUDA graphs, kept capture" if graphed else "eager"
        extra = f"; first image with its capture {first:.2f} s" if graphed else ""
        print(f"{args.size}x{args.size} image, {label}: {sec:.2f} s ({sec / n * 1000:.2f} ms/token), "
              f"peak VRAM {peak:.1f} GB{extra}")
    graphs.release(bb)
    del bb, head, step, loop, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--formats", default="full,int8,fp8", help="full (the --dtype weights), int8, fp8")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--bandwidth", type=float, default=4800.0, help="GB/s for the floor (H200 4800, H100 SXM 3350)")
    ap.add_argument("--small", action="store_true", help="toy shapes (check the script, not the GPU)")
    ap.add_argument("--eager", action="store_true", help="also time a whole image without CUDA graphs (slow)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = SMALL if args.small else FULL
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{'small' if args.small else 'full'} shapes, {args.dtype}, {args.size}x{args.size} "
          f"({(args.size // 16) ** 2} tokens), {args.steps} steps, cfg 7.5 (2 rows), {device} {name}, torch {torch.__version__}")
    with torch.inference_mode():
        for fmt in args.formats.split(","):
            measure(fmt.strip(), args, shape, device, dtype)


if __name__ == "__main__":
    main()
