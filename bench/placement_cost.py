"""What a run pays to place a streamed backbone, which the nodes now pay once instead of every run
(or every storyboard panel): layers of the 14B shape in int4, the streamed ones copied into the one
host buffer (and each configured for the device), the resident ones moved.

    python bench/placement_cost.py                 # CPU: 8 layers of the 14B shape, about a minute
    python bench/placement_cost.py --device cuda   # on a GPU: also page-locking and the copies to it

On CPU "moving" a resident layer costs nothing and no memory is page-locked, so the CPU figure is
the floor of the GPU's; the placement a later run reuses costs nothing at all (no copy, no call).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import FULL, build  # noqa: E402
from nextstep_core.memory import GiB  # noqa: E402
from nextstep_core.weights.streaming import layer_bytes, stream_layers  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=8, help="layers of the 14B shape to build (48 in the model)")
    ap.add_argument("--format", default="int4", choices=["bf16", "int8", "int4"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    bb, _head = build(dict(FULL, layers=args.layers), torch.device("cpu"), torch.bfloat16, args.format, "cpu")
    per_layer = layer_bytes(bb.layers[0])
    resident = args.layers // 2
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        streamer = stream_layers(bb, resident, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        streamer.remove()
        bb.to("cpu")
    streamed = args.layers - resident
    best = min(times)
    print(f"{args.format}, {per_layer / GiB:.3f} GiB per layer; {resident} resident, {streamed} streamed on {device}")
    print(f"placing: {', '.join(f'{t:.2f}' for t in times)} s  (best {best:.2f} s, "
          f"{best / streamed * 1000:.0f} ms per streamed layer)")
    # an 8 GB card with int4 keeps 27 of 48 layers and streams 21 (README table)
    print(f"an 8 GB card (int4: 21 of 48 layers streamed): about {best / streamed * 21:.1f} s per placement, "
          "paid once by the nodes now instead of on every run and storyboard panel")


if __name__ == "__main__":
    main()
