"""Load time and peak RAM of loading a multi-GB sharded checkpoint, against reading the same
bytes from disk. Peak RAM near the weights' size (not double) is what memory-mapped, one
tensor at a time loading buys.

    python bench/load_checkpoint.py                 # writes a ~2 GB bf16 sharded checkpoint to a temp dir
    python bench/load_checkpoint.py --model DIR     # measure a real model folder instead

Each measurement runs in a fresh process (peak RSS is per process); the files are read once
before timing so both sides see the page cache alike.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HWM = "int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]) * 1024"

READ = """
import os, sys, time
t = time.perf_counter(); n = 0
for f in sys.argv[1:]:
    with open(f, 'rb', buffering=0) as fh:
        while True:
            b = fh.read(64 << 20)
            if not b: break
            n += len(b)
print(time.perf_counter() - t, """ + HWM + """, n)
"""

LOAD = """
import sys, time
sys.path.insert(0, {root!r})
import torch
from nextstep_core.checkpoint import load_backbone, load_flow_head
base = """ + HWM + """
t = time.perf_counter()
bb, tok = load_backbone(sys.argv[1], dtype=torch.bfloat16)
head = load_flow_head(sys.argv[1], dtype=torch.bfloat16)
sec = time.perf_counter() - t
n = sum(p.numel() * p.element_size() for m in (bb, head) for p in m.parameters())
lazy = """ + HWM + """ - base
t = time.perf_counter()
with torch.no_grad():
    for m in (bb, head):
        for p in m.parameters():
            p.float().sum()
touch = time.perf_counter() - t
print(lazy, touch, sec, """ + HWM + """ - base, n)
"""


def write_checkpoint(folder: str, hidden: int, layers: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file
    from nextstep_core.tiny import write_tiny
    write_tiny(folder, hidden=hidden, layers=layers, heads=16, kv_heads=4, mlp=hidden * 11 // 4, head_width=512,
               head_layers=4, shards=4, force=True)
    # rewrite the shards in bf16, as the Hub ships them
    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())
    from safetensors.torch import load_file
    for shard in sorted(set(index["weight_map"].values())):
        path = os.path.join(folder, shard)
        state = {k: v.to(torch.bfloat16) for k, v in load_file(path).items()}
        save_file(state, path, metadata={"format": "pt"})


def run(code: str, *args) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.split()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an existing model folder (default: write a synthetic one)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--write", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write:
        return write_checkpoint(args.write, args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or os.path.join(tmp, "model")
        if not args.model:  # in a child process, so this one stays small
            subprocess.run([sys.executable, __file__, "--write", folder, "--hidden", str(args.hidden),
                            "--layers", str(args.layers)], check=True)
        shards = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
        run(READ, *shards)  # warm the page cache
        r_sec, r_rss, r_bytes = run(READ, *shards)
        lazy, touch, l_sec, l_rss, l_bytes = run(LOAD.format(root=str(ROOT)), folder)
    gb = 1e9
    r_sec, r_rss, r_bytes = r_sec, int(r_rss), int(r_bytes)
    print(f"{len(shards)} shards, {r_bytes / gb:.2f} GB on disk; {l_bytes / gb:.2f} GB of backbone + flow head weights")
    print("| what | seconds | GB/s | peak RSS added, GB |")
    print("|---|---|---|---|")
    print(f"| read the bytes (64 MB chunks) | {r_sec:.2f} | {r_bytes / gb / r_sec:.2f} | {r_rss / gb:.2f} (whole process) |")
    print(f"| load_backbone + load_flow_head (bf16, memory-mapped) | {l_sec:.2f} | {l_bytes / gb / l_sec:.2f} | "
          f"{lazy / gb:.2f} (above torch import) |")
    print(f"| ... then every weight read once | +{touch:.2f} | | {l_rss / gb:.2f} |")
    print(f"load / read time: {l_sec / r_sec:.2f}x; peak RSS / weights: {l_rss / l_bytes:.2f}")


if __name__ == "__main__":
    main()
