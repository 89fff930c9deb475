"""8-bit and int4 backbone quality: teacher-forced token error against full precision, and weight bytes per
format at the 14B shapes.

    python bench/quant_error.py                         # random small model (hidden 512 x 8 layers), 256x256
    python bench/quant_error.py --tiny                  # the test suite's tiny model, 64x64
    python bench/quant_error.py --model DIR --device cuda --dtype bfloat16   # a real checkpoint

One free-running generation gives the reference tokens; then every variant samples each token
from its own state after the reference's previous tokens, with the reference's noise. Errors are
||token - reference|| / ||reference|| per token (mean, max, first image token) and the same for
the final hidden states. The fp8 matmul row (fp8 activations too) appears where the kernel runs:
CUDA with SM >= 8.9 in bfloat16, or anywhere with NEXTSTEP_FP8_MATMUL=on and --dtype bfloat16.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.backbone import Backbone  # noqa: E402
from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae  # noqa: E402
from nextstep_core.config import BackboneConfig, FlowHeadConfig  # noqa: E402
from nextstep_core.engine import SamplingSettings  # noqa: E402
from nextstep_core.flow_head import FlowHead  # noqa: E402
from nextstep_core.pipeline import NextStepPipeline, Request  # noqa: E402
from nextstep_core.weights.quant import LINEARS, empty_quantized_layers, quantize_backbone, quantized_names  # noqa: E402
from nextstep_core.tiny import write_tiny  # noqa: E402
from nextstep_core.token_error import relative_error, teacher_forced  # noqa: E402

FULL = BackboneConfig(hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
                      intermediate_size=13824, vocab_size=152064)


def weight_bytes(fmt):
    """(decoder matrices + scales, rest of the backbone, LM head, flow head) in bytes, bf16 elsewhere."""
    with torch.device("meta"):
        bb = Backbone(FULL, with_lm_head=True)
        head = FlowHead(FlowHeadConfig(64, FULL.hidden_size, 1536, 12))
        if fmt:
            empty_quantized_layers(bb, fmt)
    matrices = {f"layers.{i}.{p}.{t}" for i in range(FULL.num_layers) for p in LINEARS for t in ("weight", "scale")}
    eight_bit = quantized_names(bb)
    parts = [0, 0, 0, sum(t.numel() * 2 for t in head.state_dict().values())]
    for name, t in bb.state_dict().items():
        size = t.numel() * (t.element_size() if name in eight_bit else 2)
        parts[0 if name in matrices else 2 if name.startswith("lm_head.") else 1] += size
    return parts


def generate(args, folder):
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    bb, tok = load_backbone(folder, dev, dtype)
    head = load_flow_head(folder, dev, dtype)
    pipe = NextStepPipeline(bb, tok, head, load_vae(folder, dev, dtype))
    pipe.decode = lambda tokens, grid: tokens  # tokens are what is compared
    s = SamplingSettings(cfg=args.cfg, steps=args.steps)
    run = pipe.run(Request([args.prompt], args.size, args.size, seed=args.seed, sampling=s))
    return bb, head, run, s


def row(name, bb, head, run, s, ref, ref_h, seed):
    t, h = teacher_forced(bb, head, run.rows, run.tokens, s, seed=seed)
    e, eh = relative_error(t, ref), relative_error(h, ref_h)
    print(f"| {name} | {e.mean():.4f} | {e.max():.4f} | {e[:, 0].mean():.4f} | {eh.mean():.4f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a NextStep model folder (default: write a random one)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model (hidden 64 x 2 layers), 64x64")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--head-width", type=int, default=512)
    ap.add_argument("--head-layers", type=int, default=6)
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--prompt", default="a red cube on a table")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated formats to run (int8, fp8, int4)")
    ap.add_argument("--int4-group", type=int, default=128, help="int4 group size (a power of two, 16-128)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.size = args.size or (64 if args.tiny else 256)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            shape = {} if args.tiny else dict(hidden=args.hidden, layers=args.layers, heads=8, kv_heads=2,
                                              mlp=3 * args.hidden, head_width=args.head_width,
                                              head_layers=args.head_layers)
            folder = write_tiny(os.path.join(tmp, "NextStep-1-Large"), **shape)
        bb, head, run, s = generate(args, folder)
        ref, ref_h = teacher_forced(bb, head, run.rows, run.tokens, s, seed=args.seed)
        print(f"{'tiny' if args.tiny else 'model' if args.model else 'small'}: hidden {bb.cfg.hidden_size} x "
              f"{bb.cfg.num_layers} layers, {args.size}x{args.size} ({run.tokens.shape[1]} tokens), {args.steps} "
              f"steps, cfg {args.cfg}, {args.dtype} on {args.device}, torch {torch.__version__}")
        print(f"teacher-forced reference vs its own free run: max {relative_error(ref, run.tokens).max():.1e}\n")
        print("| backbone | token error mean | max | first token | hidden error mean |")
        print("|---|---|---|---|---|")
        variants = [("int8", "int8", "off"), ("fp8 (dequantized)", "fp8", "off"), ("fp8 matmul (fp8 activations)",
                                                                                   "fp8", "auto"),
                    ("int4 (group 128; kernel, bf16 activations)", "int4", "int4-kernel"),
                    ("int4 (dequantized)", "int4", "int4-off")]
        asked = os.environ.get("NEXTSTEP_FP8_MATMUL", "auto")
        import nextstep_core.weights.int4 as int4
        int4.GROUP = args.int4_group
        variants = [(n.replace("group 128", f"group {args.int4_group}"), f, m) for n, f, m in variants
                    if not args.only or f in args.only.split(",")]
        for name, fmt, mm in variants:
            os.environ["NEXTSTEP_FP8_MATMUL"] = asked if mm == "auto" else "off" if mm.startswith("int4") else mm
            os.environ["NEXTSTEP_INT4_MATMUL"] = "off" if mm == "int4-off" else "auto"
            q = quantize_backbone(copy.deepcopy(bb), fmt)
            for m in q.modules():  # int4 picks its CPU layout before the first use
                if hasattr(m, "prepare"):
                    m.prepare()
            if mm == "int4-kernel" and q.layers[0].mlp.up_proj.kernel is None:
                continue
            if mm == "auto" and not (q.layers[0].mlp.up_proj.scaled_mm and bb.dtype == torch.bfloat16):
                continue
            row(name, q, head, run, s, ref, ref_h, args.seed)
        if bb.dtype != torch.float32:  # how far the reference itself is from float32: the scale of "small"
            row("float32, not quantized", copy.deepcopy(bb).float(), head, run, s, ref, ref_h, args.seed)
    print("\nWeights at the 14B shapes (GB = 1e9 bytes; bf16 for everything not 8-bit):\n")
    print("| format | decoder matrices (+ scales) | embeddings, norms, biases, projectors | LM head | flow head | "
          "file with LM head | without |")
    print("|---|---|---|---|---|---|---|")
    for fmt in (None, "int8", "fp8", "int4"):
        layers, rest, lm, fh = (b / 1e9 for b in weight_bytes(fmt))
        print(f"| {fmt or 'bf16'} | {layers:.2f} | {rest:.2f} | {lm:.2f} | {fh:.2f} | {layers + rest + lm + fh:.2f} | "
              f"{layers + rest + fh:.2f} |")


if __name__ == "__main__":
    main()
