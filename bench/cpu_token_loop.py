"""CPU benchmark of the token loop: per-token time split into backbone / flow head / other,
against a straightforward reference loop on the same random weights in the same process.

    python bench/cpu_token_loop.py            # small config: hidden 512, 8 layers, 256x256, 28 steps, cfg 7.5
    python bench/cpu_token_loop.py --rounds 5 # reference and engine alternately, 5 times: the median ratio

Prints a markdown table; the ratio column is the figure to quote (absolute times drift with the
machine). "CPU s" is the process CPU time of the loop (all threads), which moves much less than wall
time when other work shares the cores. Peak RSS is the whole process's high-water mark. On a shared
or throttled machine the speed drifts over tens of seconds, so one engine run against one reference
run can be off by a third; `--rounds N` alternates them and reports each round's ratio and the median.
"""
from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.reference_loop import sample_tokens as reference_tokens  # noqa: E402
from nextstep_core.backbone import Backbone  # noqa: E402
from nextstep_core.config import BackboneConfig, FlowHeadConfig  # noqa: E402
from nextstep_core.engine import Execution, SamplingSettings, TokenLoop, noise_for  # noqa: E402
from nextstep_core.flow_head import FlowHead  # noqa: E402
from nextstep_core.noise import make_generator  # noqa: E402


HEAD_PARTS = ("prepare", "velocity")  # both modes (exact and fast)


def build(args):
    torch.manual_seed(0)
    cfg = BackboneConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=2,
                         head_dim=args.hidden // 8, intermediate_size=args.hidden * 3, vocab_size=1024,
                         rms_norm_eps=1e-6, rope_theta=1e6)
    bb = Backbone(cfg)
    head = FlowHead(FlowHeadConfig(64, args.hidden, args.head_width, args.head_layers))
    for m in (bb, head):
        for p in m.parameters():
            p.data.normal_(0, 0.5 / p.shape[-1] ** 0.5)
    return bb.eval(), head.eval()


def timed(obj, name, timers, key):
    fn = getattr(obj, name, None)
    if fn is None:
        return

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        timers[key] += time.perf_counter() - t0
        return out
    setattr(obj, name, wrapper)


def run_engine(bb, head, ids, mask, n_tokens, args):
    timers = defaultdict(float)
    s = SamplingSettings(cfg=args.cfg, steps=args.steps)
    timed(bb, "step", timers, "backbone")
    for name in HEAD_PARTS:
        timed(head, name, timers, "head")
    t0 = time.perf_counter()
    cache = bb.new_cache(ids.shape[0], ids.shape[1] + n_tokens)
    hidden = bb.prefill(bb.embed(ids), mask, cache, ids.shape[1])[:, -1]
    timers["prefill"] = time.perf_counter() - t0
    noise = noise_for(s, make_generator(0), 1, ids.shape[0] // 2, 64, "cpu", n_tokens)
    t1, c1 = time.perf_counter(), time.process_time()
    TokenLoop(bb, head, s, Execution(exact=args.exact)).run(hidden, cache, 2, n_tokens, noise)
    total = time.perf_counter() - t1
    timers["cpu"] = time.process_time() - c1
    for name in ("step",) + HEAD_PARTS:
        for obj in (bb, head):
            obj.__dict__.pop(name, None)
    return total, timers


def run_reference(bb, head, ids, mask, n_tokens, args):
    timers = defaultdict(float)
    t0, c0 = time.perf_counter(), time.process_time()
    reference_tokens(bb, head, ids, mask, 2, n_tokens, args.steps, args.cfg, 1.0, make_generator(0), timers)
    timers["cpu"] = time.process_time() - c0  # includes its (small) prefill
    return time.perf_counter() - t0 - timers["prefill"], timers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--head-width", type=int, default=512)
    ap.add_argument("--head-layers", type=int, default=6)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="time the engine only (A/B runs of two checkouts)")
    ap.add_argument("--exact", action="store_true", help="time the engine's bit-parity path instead of the fast one")
    ap.add_argument("--quant", choices=["int8", "fp8"], help="8-bit backbone weights for the engine row")
    ap.add_argument("--rounds", type=int, default=1, help="alternate reference and engine this many times")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bb, head = build(args)
    n_tokens = (args.size // 16) ** 2
    ids = torch.randint(0, 1000, (2, 24))
    mask = torch.ones_like(ids)
    rounds = []  # (reference wall, reference CPU, engine wall, engine CPU)
    with torch.inference_mode():
        if args.quant:
            from nextstep_core.weights.convention import quantize_backbone
            eng_bb = quantize_backbone(copy.deepcopy(bb), args.quant)
        else:
            eng_bb = bb
        run_engine(eng_bb, head, ids, mask, 4, args)  # warm-up
        for _ in range(max(1, args.rounds)):
            ref_total, ref = (None, None) if args.no_reference else run_reference(bb, head, ids, mask, n_tokens, args)
            eng_total, eng = run_engine(eng_bb, head, ids, mask, n_tokens, args)
            if ref is not None:
                rounds.append((ref_total, ref["cpu"], eng_total, eng["cpu"]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def row(name, total, tm):
        per = lambda s: s / n_tokens * 1000
        other = total - tm["backbone"] - tm["head"]
        return (f"| {name} | {total:.2f} | {tm['cpu']:.2f} | {per(total):.1f} | {per(tm['backbone']):.1f} | "
                f"{per(tm['head']):.1f} | {per(other):.1f} | {60 / total:.2f} |")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads; "
          f"hidden {args.hidden} x {args.layers} layers, head {args.head_width} x {args.head_layers}, "
          f"{args.size}x{args.size} ({n_tokens} tokens), {args.steps} steps, cfg {args.cfg} (2 CFG rows)")
    print("| loop | generate s | CPU s | ms/token | backbone ms/token | head ms/token | other ms/token | images/min |")
    print("|---|---|---|---|---|---|---|---|")
    print(row(f"engine{', exact' if args.exact else ''}{', ' + args.quant + ' backbone' if args.quant else ''}",
              eng_total, eng))
    if ref is None:
        return
    print(row("reference (no hoisting, growing cache)", ref_total, ref))
    print(f"\nspeed-up engine vs reference: {ref_total / eng_total:.2f}x wall, {ref['cpu'] / eng['cpu']:.2f}x CPU time "
          f"(head {ref['head'] / max(eng['head'], 1e-9):.2f}x, backbone {ref['backbone'] / max(eng['backbone'], 1e-9):.2f}x); "
          f"peak RSS {rss:.0f} MiB")
    if len(rounds) > 1:
        wall = sorted(e / r for r, _, e, _ in rounds)
        cpu = sorted(e / r for _, r, _, e in rounds)
        print(f"engine / reference by round (wall): {', '.join(f'{e / r:.3f}' for r, _, e, _ in rounds)}; "
              f"median {statistics.median(wall):.3f} wall, {statistics.median(cpu):.3f} CPU time "
              "(the rows above are the last round)")


if __name__ == "__main__":
    main()
