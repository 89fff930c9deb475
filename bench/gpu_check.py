"""The device check: full-size NextStep shapes (random weights: 48 layers, hidden 5120, GQA 40/8,
MLP 13824; flow head 1536 x 12) at 512x512, cfg 7.5, 28 steps, for bf16 / int8 / fp8 / int4
decoder weights with CUDA graphs off and on; then the GPU capped at 8 / 12 / 16 / 24 GB
(`set_per_process_memory_fraction`), the backbone placed by the memory model, the rest streamed.

    python bench/gpu_check.py                      # one H200: about 6-7 minutes
    python bench/gpu_check.py --small --device cpu # toy shapes on CPU: checks the script (tests run it)

Each configuration generates `--tokens` image tokens of a 512x512 image (after a short warm-up)
and extrapolates seconds per image as prefill + 1024 x ms/token; peak memory is torch's
high-water mark. Streamed rows also give the bytes that cross PCIe per token.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.backbone import Backbone  # noqa: E402
from nextstep_core.config import BackboneConfig, FlowHeadConfig  # noqa: E402
from nextstep_core.engine import SamplingSettings, TokenLoop, noise_for  # noqa: E402
from nextstep_core.flow_head import FlowHead  # noqa: E402
from nextstep_core.memory import GiB, plan  # noqa: E402
from nextstep_core.noise import make_generator  # noqa: E402
from nextstep_core.weights.streaming import stream_layers  # noqa: E402
from nextstep_core.weights.quant import quantize_layer  # noqa: E402

FULL = dict(hidden=5120, layers=48, heads=40, kv=8, mlp=13824, head_width=1536, head_layers=12, vocab=152064)
SMALL = dict(hidden=256, layers=6, heads=4, kv=2, mlp=512, head_width=128, head_layers=2, vocab=512)
IMAGE_TOKENS = 1024  # 512x512
PROMPT = 64


class Enough(Exception):
    """Raised from the token callback once the timed tokens are done."""


def config(shape) -> BackboneConfig:
    return BackboneConfig(hidden_size=shape["hidden"], num_layers=shape["layers"], num_heads=shape["heads"],
                          num_kv_heads=shape["kv"], head_dim=shape["hidden"] // shape["heads"],
                          intermediate_size=shape["mlp"], vocab_size=shape["vocab"], rope_theta=1e6)


def _randomize(module, device, dtype):
    module.to_empty(device=device)
    for p in module.parameters():
        p.data = (torch.randn(p.shape, device=device) * (0.5 / p.shape[-1] ** 0.5)).to(dtype)


def build(shape, device, dtype, fmt, layers_on):
    """Layer by layer (random, quantized where it was made), each layer then moved to `layers_on`:
    a capped run keeps them in RAM, as a real load for streaming does."""
    with torch.device("meta"):
        bb = Backbone(config(shape))
        head = FlowHead(FlowHeadConfig(64, shape["hidden"], shape["head_width"], shape["head_layers"]))
    for name, child in bb.named_children():
        if name != "layers":
            _randomize(child, device, dtype)
    for layer in bb.layers:
        _randomize(layer, device, dtype)
        if fmt != "bf16":
            quantize_layer(layer, fmt)
        layer.to(layers_on)
    _randomize(head, device, dtype)
    return bb.eval(), head.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_tokens(bb, head, device, tokens, graphs, steps=28) -> tuple[float, float]:
    """-> (prefill seconds, seconds per image token) over `tokens` tokens of a 512x512 image."""
    s = SamplingSettings(cfg=7.5, steps=steps, cuda_graphs=graphs)
    ids = torch.randint(0, 500, (2, PROMPT), device=device)
    stamps = []

    def stop(done, total, _tok):
        if done in (2, 2 + tokens):  # the first two tokens include capture and the kernels' first use
            sync(device)
            stamps.append(time.perf_counter())
        if done == 2 + tokens:
            raise Enough
    sync(device)
    t0 = time.perf_counter()
    cache = bb.new_cache(2, PROMPT + IMAGE_TOKENS)
    hidden = bb.prefill(bb.embed(ids), torch.ones_like(ids), cache, PROMPT)[:, -1]
    sync(device)
    prefill = time.perf_counter() - t0
    noise = noise_for(s, make_generator(0), 1, 1, 64, device, IMAGE_TOKENS)
    try:
        TokenLoop(bb, head, s).run(hidden, cache, 2, IMAGE_TOKENS, noise, callback=stop)
    except Enough:
        pass
    return prefill, (stamps[1] - stamps[0]) / tokens


def peak_gb(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def reset(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.reset_peak_memory_stats(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="toy shapes (checks the script, not the GPU)")
    ap.add_argument("--tokens", type=int, default=64, help="timed image tokens per configuration")
    ap.add_argument("--steps", type=int, default=28, help="flow steps per token (fewer only to check the script)")
    ap.add_argument("--formats", default="bf16,int8,fp8,int4")
    ap.add_argument("--caps", default="8,12,16,24", help="GB the GPU is capped to for the streaming rows")
    ap.add_argument("--cap-formats", default="int8,int4")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shape = SMALL if args.small else FULL
    cfg = config(shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 matmuls on a CPU are slow
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{'small' if args.small else 'full-size'} shapes ({cfg.num_layers} layers, hidden {cfg.hidden_size}), "
          f"512x512 ({IMAGE_TOKENS} tokens), cfg 7.5, {args.steps} steps; {args.tokens} tokens timed per row; {name}, torch "
          f"{torch.__version__}\n")
    print("| decoder weights | cuda graphs | s/image | ms/token | prefill s | peak GB |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for fmt in args.formats.split(","):
            reset(device)
            bb, head = build(shape, device, dtype, fmt, device)
            for graphs in ("off", "on") if device.type == "cuda" else ("off",):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                pre, per = timed_tokens(bb, head, device, args.tokens, graphs, args.steps)
                label = fmt if fmt != "bf16" or dtype == torch.bfloat16 else "fp32"
                print(f"| {label} | {graphs} | {pre + per * IMAGE_TOKENS:.1f} | {per * 1000:.2f} | {pre:.2f} | "
                      f"{peak_gb(device):.1f} |", flush=True)
            del bb, head
        print("\n| cap GB | decoder weights | layers on GPU | streamed GB/token | s/image | ms/token | peak GB |")
        print("|---|---|---|---|---|---|---|")
        for fmt in args.cap_formats.split(","):
            for cap in args.caps.split(","):
                reset(device)
                bb, head = build(shape, device, dtype, fmt, "cpu")
                whole = plan(cfg, fmt if fmt != "bf16" else None, dtype.itemsize, width=512, height=512, context_tokens=PROMPT)
                if device.type == "cuda":
                    limit = float(cap) * 1e9
                    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(device)
                                                               .total_memory, device)
                    free = int(limit - torch.cuda.memory_allocated(device))
                else:  # no cap to set: the layers' share of free memory scaled as cap / 32 GB
                    none = plan(cfg, fmt if fmt != "bf16" else None, dtype.itemsize, width=512, height=512,
                                context_tokens=PROMPT, gpu_layers=0)
                    free = int(none.device_bytes + (whole.device_bytes - none.device_bytes) * float(cap) / 32)
                try:
                    p = plan(cfg, fmt if fmt != "bf16" else None, dtype.itemsize, width=512, height=512, context_tokens=PROMPT,
                             free_bytes=free)
                except Exception as exc:  # the memory model's refusal is a result too
                    print(f"| {cap} | {fmt} | refused: {str(exc)[:90]} | | | | |", flush=True)
                    continue
                streamer = stream_layers(bb, p.resident, device, p)
                pre, per = timed_tokens(bb, head, device, args.tokens, "auto", args.steps)
                print(f"| {cap} | {fmt} | {p.resident}/{p.layers} | {p.streamed_bytes / 1e9:.3g} | "
                      f"{pre + per * IMAGE_TOKENS:.1f} | {per * 1000:.1f} | {peak_gb(device):.1f} |", flush=True)
                if streamer is not None:
                    streamer.remove()
                del bb, head, streamer
    reset(device)


if __name__ == "__main__":
    main()
