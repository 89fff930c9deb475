"""The device check: one run that shows the engine's GPU paths are right, by comparing tokens, and
how fast they are. Random weights at NextStep's full shapes (48 layers, hidden 5120, GQA 40/8, MLP
13824; flow head 1536 x 12), a 512x512 image with CFG 7.5, 28 steps; nothing is downloaded.

    python bench/gpu_check.py --json gpu_check.json          # one H100 / H200: a few minutes
    python bench/gpu_check.py --table gpu_check.json         # the markdown tables of docs/benchmarks.md
    python bench/gpu_check.py --small --device cpu           # toy shapes on a CPU (the tests run this)

Rows (each isolated: a failure prints its exception and FAIL, and the next row still runs):
  graph        CUDA graph vs eager, bf16; speed of both
  sdpa         the SDPA kernel of each call site (prefill, token step at 3 lengths, captured step, Self-CoT)
  streamed     CLI layer streaming (a sixth of the layers from registered RAM) vs resident
  offload      memory_allocated before the weights, after an image, after moving the parts to the CPU
  paged        layers in RAM paged in per layer by a layer_runner (run_device set, paged=True) vs
               resident: what ComfyUI's dynamic VRAM does, as far as it runs without ComfyUI
  int8/fp8/int4  the device's quantized kernels vs the same weights dequantized; CUDA graph vs eager
  alloc-async  graph, offload and paged again in a child process under
               PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (ComfyUI's allocator)
  cuda1        graph on cuda:1 in a child process, where there are two GPUs

Tokens are compared over the first 8 image tokens (relative error per token, bounds stated in
gpu_check_support.BOUNDS). Speed: ms/token over `--tokens` tokens after the first two, against the
floor (bytes a token must read / the measured device-to-device copy bandwidth); s/image = prefill +
1024 x ms/token; peak GB = torch's high-water mark. Every figure goes to the `--json` file; the
summary prints one ok / FAIL / skip line per row, and the exit status is 1 when a row failed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_check_rows import ROWS, Check, Skip, clear_workspaces  # noqa: E402
from bench.gpu_check_support import (BOUNDS, CFG, COMPARE, FULL, IMAGE_TOKENS, PROMPT, SMALL,  # noqa: E402
                                     Figures, copy_bandwidth, free_device, host_bandwidth)
from bench.gpu_check_table import table  # noqa: E402
from nextstep_core.devices import free_bytes  # noqa: E402

CHILD_ROWS = "graph,offload,paged"
ASYNC = "backend:cudaMallocAsync"
ORDER = [*ROWS, "alloc-async", "cuda1"]  # the child processes last: by then this one holds no weights
CHILD_LIMIT_S = 420  # a child that hangs is killed (and its row fails) rather than holding the check


def child(ck: Check, fig: Figures, args, device: str, rows: str, env: dict) -> dict:
    """Run this script again for `rows` on `device` with `env` added; its output is shown as it comes,
    its JSON returned. The parent drops its weights first, so the child has the card to itself."""
    ck.drop_parts()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "child.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", device, "--rows", rows, "--json", out,
               "--steps", str(args.steps), "--tokens", str(args.tokens)] + (["--small"] if args.small else []) + (
                   ["--dtype", args.dtype] if args.dtype else [])
        print(f"    child: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **env})
        timer = threading.Timer(CHILD_LIMIT_S, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                print(f"    | {line.rstrip()}", flush=True)
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
        if not os.path.exists(out):
            raise RuntimeError(f"the child process exited with status {proc.returncode} without its JSON")
        with open(out, encoding="utf-8") as fh:
            report = json.load(fh)
    fig.values["child"] = report
    for name, row in report["rows"].items():
        fig.check(f"{name} in the child", not row["status"].startswith("FAIL"), row["status"])
    return report


def alloc_async(ck: Check, fig: Figures, args) -> None:
    """graph, offload and paged again in a child process under PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
    (ComfyUI's default allocator). Off CUDA the child still runs (the rows it can run are compared)."""
    report = child(ck, fig, args, args.device, CHILD_ROWS, {"PYTORCH_CUDA_ALLOC_CONF": ASYNC})
    if not ck.cuda:
        if not fig.failed:
            raise Skip("needs CUDA")
        return
    fig.check("allocator in the child", report.get("allocator") == "cudaMallocAsync", str(report.get("allocator")))


def cuda1(ck: Check, fig: Figures, args) -> None:
    """CUDA graph vs eager on the second GPU, in a child process (the current device stays cuda:0
    there: streams, synchronisation and capture must follow the run's device)."""
    if not ck.cuda:
        raise Skip("needs CUDA")
    if torch.cuda.device_count() < 2:
        raise Skip("needs 2 GPUs")
    other = 1 if (ck.device.index or 0) == 0 else 0
    child(ck, fig, args, f"cuda:{other}", "graph", {})


def run_row(name: str, fn, ck: Check) -> dict:
    doc = getattr(fn, "func", fn).__doc__ or ""
    print(f"\n== {name}: {' '.join(doc.split()).replace('{dtype}', ck.label)}", flush=True)
    fig, t0 = Figures(), time.perf_counter()
    try:
        fn(ck, fig)
        status, note = ("FAIL", "; ".join(fig.failed)) if fig.failed else ("ok", "")
    except Skip as why:
        status, note = f"skip ({why})", ""
    except Exception as exc:  # the row failed; the next one runs
        traceback.print_exc(file=sys.stdout)
        status, note = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if ck.cuda:
            try:  # after a CUDA error the context may refuse even this; the next row then says so
                torch.cuda.synchronize(ck.device)
                free_device(ck.device)
            except Exception as again:
                print(f"    after the failure: {type(again).__name__}: {again}", flush=True)
    seconds = time.perf_counter() - t0
    print(f"{status}  {name}  ({seconds:.1f} s){'  ' + note if note else ''}", flush=True)
    return dict(status=status, note=note, seconds=seconds, **fig.values)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on CUDA, float32 elsewhere")
    ap.add_argument("--small", action="store_true", help="toy shapes (checks the script, not the GPU)")
    ap.add_argument("--steps", type=int, default=28, help="flow steps per token")
    ap.add_argument("--tokens", type=int, default=64, help="timed image tokens per speed figure")
    ap.add_argument("--rows", default=",".join(ORDER), help=f"comma-separated subset of: {', '.join(ORDER)}")
    ap.add_argument("--json", default="gpu_check.json", help="where the figures are written (default: "
                    "gpu_check.json in the current folder)")
    ap.add_argument("--table", metavar="JSON", help="print the markdown tables made from such a file, and stop")
    ap.add_argument("--fault", action="append", default=[], metavar="ROW[:raise]",
                    help="for the tests only: break ROW on purpose (its candidate run reads a perturbed input, or "
                         "with :raise it raises), to show that the row FAILs and the next one still runs")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ORDER]
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}: choose from {', '.join(ORDER)}")
    unknown = [f for f in args.fault if f.split(":")[0] not in ROWS or f.count(":") > 1 or
               (":" in f and not f.endswith(":raise"))]
    if unknown:
        ap.error(f"--fault {unknown[0]}: use ROW or ROW:raise, ROW one of {', '.join(ROWS)}")
    return args, rows


def main(argv=None) -> int:
    args, rows = parse(argv)
    if args.table:
        with open(args.table, encoding="utf-8") as fh:
            print(table(json.load(fh)))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; use "
                         "--small --device cpu to check the script on a CPU.")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    faults = {f.split(":")[0]: "raise" if f.endswith(":raise") else "tokens" for f in args.fault}
    ck = Check(device, dtype, SMALL if args.small else FULL, args.steps, args.tokens, faults)
    name = torch.cuda.get_device_name(device) if ck.cuda else "cpu"
    allocator = torch.cuda.memory.get_allocator_backend() if ck.cuda else None
    print(f"{name}, torch {torch.__version__}{', allocator ' + allocator if allocator else ''}; "
          f"{'small' if args.small else 'full-size'} shapes {ck.shape}, {ck.label}, 512x512 ({IMAGE_TOKENS} tokens), "
          f"cfg {CFG}, {args.steps} steps, prompt {PROMPT} x 2 rows; {COMPARE} tokens compared, {args.tokens} timed")
    with torch.inference_mode():
        if ck.cuda:
            torch.cuda.init()
            clear_workspaces()
            ck.start_allocated = torch.cuda.memory_allocated(device)
            ck.start_free = free_bytes(device)
        size = (64 if args.small else 1024) * 2 ** 20
        ck.copy_gbps = copy_bandwidth(device, size)
        ck.host_gbps = host_bandwidth(device, size // 4)
        free_device(device)
        print(f"copy bandwidth {ck.copy_gbps:.0f} GB/s (device to device, read + write)"
              + (f"; host to device {ck.host_gbps:.1f} GB/s (page-locked)" if ck.host_gbps else ""))
        results = {}
        for row in [r for r in ORDER if r in rows]:
            fn = ROWS.get(row) or functools.partial(alloc_async if row == "alloc-async" else cuda1, args=args)
            results[row] = run_row(row, fn, ck)
    report = dict(device=name, run_device=str(device), torch=torch.__version__, allocator=allocator,
                  shapes="small" if args.small else "full",
                  shape=ck.shape, dtype=ck.label, steps=args.steps, cfg=CFG, prompt=PROMPT, image_tokens=IMAGE_TOKENS,
                  compare_tokens=COMPARE, timed_tokens=args.tokens, copy_gbps=ck.copy_gbps, host_gbps=ck.host_gbps,
                  bounds=BOUNDS, faults=faults, date=time.strftime("%Y-%m-%d"), rows=results)
    from nextstep_core.atomic_write import atomic_file
    with atomic_file(args.json) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1, default=str)
    print("\nsummary")
    for row, r in results.items():
        print(f"{r['status']:<22} {row}{'  ' + r['note'] if r['note'] else ''}")
    print(f"figures: {args.json}")
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
