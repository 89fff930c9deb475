"""The README's memory table, from the memory model (nextstep_core/memory.py): per card size and
weight format, what stays on the GPU, what is paged in from RAM per token (by ComfyUI's dynamic
VRAM or partial loads inside ComfyUI, by the engine's streamer from the command line), and an
estimate of the time per 512x512 image (cfg 7.5, 28 steps) from the bytes each token reads.

    python bench/memory_table.py          # prints the table; tests/test_memory_table.py keeps README in sync

The estimate is a floor from bandwidth, not a measurement: per token the GPU reads its resident
decoder weights and the flow head's per-step weights 28 times (56.9M parameters in bf16 after the
adaLN hoisting) at the card's memory bandwidth, and the streamed layers cross PCIe 4.0 x16 at
25 GB/s. Real runs add kernel overheads; measured GPU figures belong in docs/benchmarks.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.config import BackboneConfig  # noqa: E402
from nextstep_core.memory import GiB, PCIE_GBPS, plan  # noqa: E402

FULL = BackboneConfig(hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
                      intermediate_size=13824, vocab_size=152064)
# (card GB, a common card of that size, its memory bandwidth GB/s)
CARDS = [(8, "RTX 3070", 448), (12, "RTX 3060 12GB", 360), (16, "RTX 4060 Ti 16GB", 288), (24, "RTX 3090", 936),
         (48, "RTX A6000", 768)]
FORMATS = [("bf16", None), ("int8", "int8"), ("fp8", "fp8"), ("int4", "int4")]
OTHER = int(0.48e9)  # flow head (157M) + VAE (84M) in bf16, resident
HEAD_READ = 28 * 56.9e6 * 2  # bytes the flow head reads per token
OVERHEAD = GiB  # CUDA context, ComfyUI's reserve, the desktop


def estimate_s(p, bandwidth_gbps: float, tokens: int = 1024) -> float:
    on_gpu = p.resident * p.layer_bytes + HEAD_READ + p.kv_bytes / 2  # the cache is half full on average
    return tokens * (on_gpu / (bandwidth_gbps * 1e9) + p.streamed_bytes / (PCIE_GBPS * 1e9))


def table() -> str:
    lines = ["| card | weights | decoder layers kept on the GPU | paged in per token | est. s per 512x512 image |",
             "|---|---|---|---|---|"]
    for gb, card, bw in CARDS:
        for name, fmt in FORMATS:
            try:
                p = plan(FULL, fmt, 2, width=512, height=512, free_bytes=gb * GiB - OVERHEAD, other_weight_bytes=OTHER)
            except Exception:
                lines.append(f"| {gb} GB ({card}) | {name} | does not run | | |")
                continue
            where = "all 48 (resident)" if not p.streamed else f"{p.resident} of 48"
            streamed = "-" if not p.streamed else f"{p.streamed_bytes / 1e9:.1f} GB"
            lines.append(f"| {gb} GB ({card}) | {name} | {where} | {streamed} | {estimate_s(p, bw):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
