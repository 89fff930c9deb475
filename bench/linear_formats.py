"""One decode matrix product per weight format: is 8-bit faster than full precision on the path it takes?

    python bench/linear_formats.py                   # CPU: float32 and bfloat16 activations, 2 rows, 5120 -> 13824
    python bench/linear_formats.py --device cuda     # the same on a GPU (bf16 only)

A decode step multiplies the 2-3 CFG rows by every weight once, so each product costs what it
reads. Rows: the full-precision product; int8 through the weight-only kernel (what int8 layers
run where the probe found it); int8 and fp8 dequantized per call (`weight.to(x.dtype)`, the
fallback, and what int8 ran before); fp8 x fp8 `_scaled_mm` where it runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.weights.quant import dequantized_linear, fp8_linear, int8_linear, quantize_weight  # noqa: E402


def timed(fn, device, reps):
    """ms per call: wall time on a GPU; on CPU the process CPU time over the threads, which other
    work sharing the cores moves much less than wall time."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000 / reps
    t0 = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - t0) * 1000 / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--n", type=int, default=13824)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    w = torch.randn(args.n, args.k, device=dev) / args.k ** 0.5
    q8, s8 = quantize_weight(w, "int8")
    f8, sf8 = quantize_weight(w, "fp8")
    dtypes = [torch.bfloat16] if dev.type == "cuda" else [torch.float32, torch.bfloat16]
    print(f"torch {torch.__version__}, {dev}, {args.threads} threads; [{args.rows}, {args.k}] x [{args.k}, {args.n}]")
    print(f"| activations | product | weight bytes read | {'ms' if dev.type == 'cuda' else 'CPU ms'} | vs full |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for dt in dtypes:
            x = torch.randn(args.rows, args.k, device=dev).to(dt)
            wf = w.to(dt)
            base = timed(lambda: F.linear(x, wf), dev, args.reps)
            rows = [("full precision", wf.numel() * wf.element_size(), base)]
            s_dt = s8.to(dt)
            try:
                rows.append(("int8 weight-only kernel", q8.numel(), timed(lambda: int8_linear(x, q8, s_dt), dev, args.reps)))
            except (RuntimeError, NotImplementedError) as exc:
                print(f"int8 kernel unavailable: {str(exc).splitlines()[0]}")
            rows.append(("int8 dequantized per call", q8.numel(), timed(lambda: dequantized_linear(x, q8, s8), dev, args.reps)))
            rows.append(("fp8 dequantized per call", f8.numel(), timed(lambda: dequantized_linear(x, f8, sf8), dev, args.reps)))
            if dt == torch.bfloat16:
                try:
                    rows.append(("fp8 x fp8 _scaled_mm", f8.numel(), timed(lambda: fp8_linear(x, f8, sf8), dev, args.reps)))
                except (RuntimeError, NotImplementedError) as exc:
                    print(f"_scaled_mm unavailable: {str(exc).splitlines()[0]}")
            for name, nbytes, ms in rows:
                print(f"| {str(dt).replace('torch.', '')} | {name} | {nbytes / 1e6:.0f} MB | {ms:.2f} | {base / ms:.2f}x |")


if __name__ == "__main__":
    main()
