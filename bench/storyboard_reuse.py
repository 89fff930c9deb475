"""Storyboard context reuse: what panel k costs when it continues the cached story, against
rebuilding the story's KV cache from its tokens first (what a pipeline without reuse does).

    python bench/storyboard_reuse.py        # hidden 512 x 8 layers, 4 panels of 256x256, 28 steps, cfg 7.5

Prints, per panel, the context step (reuse: copy the cache into a larger one; recompute: one
prefill of every earlier text and image token) and the whole panel time, and their ratios.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae  # noqa: E402
from nextstep_core.engine import SamplingSettings  # noqa: E402
from nextstep_core.pipeline import NextStepPipeline  # noqa: E402
from nextstep_core.story import StorySettings, Storyboard  # noqa: E402
from nextstep_core.tiny import write_tiny  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--panels", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny(f"{tmp}/m", hidden=args.hidden, layers=args.layers, heads=8, kv_heads=2,
                            mlp=args.hidden * 3, head_width=512, head_layers=6)
        bb, tok = load_backbone(folder)
        pipe = NextStepPipeline(bb, tok, load_flow_head(folder), load_vae(folder))
    board = Storyboard(pipe)
    s = SamplingSettings(cfg=7.5, steps=args.steps)
    ctx = board.start(StorySettings(args.size, args.size, s, negative="blurry"))
    prompts = [f"panel {i}: the hero walks on" for i in range(args.panels)]
    print(f"hidden {args.hidden} x {args.layers} layers, {args.panels} panels of {args.size}x{args.size} "
          f"({(args.size // 16) ** 2} tokens each), {args.steps} steps, cfg 7.5, {args.threads} threads")
    print("| panel | story tokens before | context: reuse ms | context: recompute ms | ratio | panel with reuse s "
          "| panel with recompute s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            before = ctx.length
            t0 = time.perf_counter()
            panel = board.add_panel(ctx, prompt, seed=i)
            reuse_total = time.perf_counter() - t0
            if ctx.cache is not None:
                t0 = time.perf_counter()
                ctx.cache.grown(ctx.length + 1)
                reuse_ctx = time.perf_counter() - t0
                t0 = time.perf_counter()
                fresh = board.recompute(ctx)
                recompute_ctx = time.perf_counter() - t0
                rebuilt = replace(ctx, cache=fresh)
                t0 = time.perf_counter()
                board.add_panel(rebuilt, prompt, seed=i)
                recompute_total = recompute_ctx + time.perf_counter() - t0
                print(f"| {i + 1} | {before} | {reuse_ctx * 1000:.1f} | {recompute_ctx * 1000:.1f} | "
                      f"{recompute_ctx / reuse_ctx:.0f}x | {reuse_total:.2f} | {recompute_total:.2f} | "
                      f"{recompute_total / reuse_total:.2f}x |")
            else:
                print(f"| 1 | 0 | - | - | - | {reuse_total:.2f} | - | - |")
            ctx = panel.context


if __name__ == "__main__":
    main()
