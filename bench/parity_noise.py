"""How far honest float noise moves our tokens from StepFun's goldens, and how far real faults do.

    python bench/parity_noise.py [--cases t2i_64 edit ...]

For every golden case: max |ours - official| of the tokens (and images) in exact mode with 1 and 2
threads, with attention written out instead of SDPA, in the default fast mode; then with one wrong
weight and with one skipped noise draw. The parity tests' bounds (tests/parity_support.py) sit
between the two groups; tests/golden/README.md records the figures.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import parity_support as ps  # noqa: E402


def variants(pipe):
    import nextstep_core.backbone as backbone
    yield "exact, 1 thread", lambda n: ps.run(pipe, n, True, threads=1)
    yield "exact, 2 threads", lambda n: ps.run(pipe, n, True, threads=2)
    yield "exact, attention written out", lambda n: _with(ps.patched(backbone, "attend", ps.attend_explicitly),
                                                          lambda: ps.run(pipe, n, True))
    yield "fast (default)", lambda n: ps.run(pipe, n, False)
    yield "FAULT one wrong weight", lambda n: _with(ps.one_wrong_weight(pipe), lambda: ps.run(pipe, n, True))
    yield "FAULT one skipped noise draw", lambda n: _with(ps.one_noise_draw_ahead(), lambda: ps.run(pipe, n, True))


def _with(ctx, fn):
    with ctx:
        return fn()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=sorted(ps.CASES))
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available; bounds: tokens "
          f"{ps.TOKEN_ATOL:g}, images {ps.IMAGE_ATOL:g}")
    worst: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = ps.write_models(Path(tmp))
        pipes = {}
        print(f"{'case':28s} {'variant':32s} {'tokens':>10s} {'images':>10s}")
        for name in args.cases:
            model = ps.CASES[name]["model"]
            pipe = pipes.get(model) or pipes.setdefault(model, ps.load_pipeline(folders[model]))
            gold = ps.golden(name)
            for label, fn in variants(pipe):
                tok, img = ps.max_diff(fn(name), gold)
                worst.setdefault(label, [0.0, 0.0, float("inf")])
                worst[label][0] = max(worst[label][0], tok)
                worst[label][1] = max(worst[label][1], img or 0.0)
                worst[label][2] = min(worst[label][2], tok)
                print(f"{name:28s} {label:32s} {tok:10.2e} {'-' if img is None else f'{img:.2e}':>10s}")
    print("\nover all cases:            largest tokens / images     smallest tokens")
    for label, (tok, img, low) in worst.items():
        print(f"  {label:32s} {tok:10.2e} / {img:9.2e}     {low:10.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
