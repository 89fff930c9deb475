"""What the device check's rows share: the random model at NextStep's shapes, one image run that
gives both its first tokens and its speed, the token comparison with its bounds, the bytes a token
must read, and the probes (copy bandwidth, SDPA backend).
"""
from __future__ import annotations

import copy
import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from nextstep_core.backbone import Backbone
from nextstep_core.config import BackboneConfig, FlowHeadConfig
from nextstep_core.engine import Execution, SamplingSettings, TokenLoop, noise_for
from nextstep_core.flow_head import FlowHead
from nextstep_core.noise import make_generator

FULL = dict(hidden=5120, layers=48, heads=40, kv=8, mlp=13824, head_width=1536, head_layers=12, vocab=152064)
SMALL = dict(hidden=256, layers=6, heads=4, kv=2, mlp=512, head_width=128, head_layers=2, vocab=512)
IMAGE_TOKENS = 1024  # 512x512
PROMPT = 64          # prompt positions per CFG row (2 rows: text CFG)
COMPARE = 8          # image tokens compared between two paths
CFG = 7.5
MB = 2 ** 20

# Bounds on the relative token error ||a - b|| / ||b|| (per image token, the worst of the first 8) of
# two paths that compute the same maths with the same weights, by the coarsest precision the
# activations pass through. Measured on a CPU (torch 2.13, 28 steps; the small shapes here and
# hidden 1024 x 12 layers, head 512 x 4), per token over the 8 tokens (the error does not grow over
# them): float32 paths agree to 1e-6 (int8 kernel, fused vs separate products, paged; 2e-4 is the
# goldens' bound, tests/parity_support.py); in bfloat16 the int8 and int4 kernels against the
# dequantized product 0.010-0.012, fp8 activations (the `_scaled_mm` path, e4m3) 0.036. Faults move
# tokens by 0.20-0.44 on the same models: the projected token zeroed (the --fault below: a step
# reading a buffer nobody wrote) 0.24-0.30, the last layer skipped 0.20-0.26, two layers' weights
# swapped (a streaming slot mix-up) 0.44. The bounds sit ~5x above honest noise and below every
# fault. Not yet measured at the full shapes on a GPU: the first GPU run prints each error beside
# its bound, to confirm or tighten them.
BOUNDS = {"float32": 1e-3, "bfloat16": 0.06, "float16": 0.06, "fp8": 0.12}


def shape_config(shape: dict) -> BackboneConfig:
    return BackboneConfig(hidden_size=shape["hidden"], num_layers=shape["layers"], num_heads=shape["heads"],
                          num_kv_heads=shape["kv"], head_dim=shape["hidden"] // shape["heads"],
                          intermediate_size=shape["mlp"], vocab_size=shape["vocab"], rope_theta=1e6)


def _fill(module: nn.Module, prefix: str, gen: torch.Generator) -> None:
    """Norm weights near 1 and the rest N(0, (0.5 / fan_in)^2), drawn in place on the device: every
    part (attention, MLP, norms, CFG, the head) moves the tokens, so a wrong one shows."""
    for name, p in module.named_parameters(prefix=prefix.rstrip(".")):
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("in_ln.weight"):
            p.data.normal_(1.0, 0.1, generator=gen)
        else:
            p.data.normal_(0.0, 0.5 / p.shape[-1] ** 0.5, generator=gen)


def build(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Backbone and flow head with random weights, made part by part on `device` (no host copy)."""
    cfg = shape_config(shape)
    with torch.device("meta"):
        bb = Backbone(cfg)
        head = FlowHead(FlowHeadConfig(cfg.token_dim, shape["hidden"], shape["head_width"], shape["head_layers"]))
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = [(n, c) for n, c in bb.named_children() if n != "layers"]
    parts += [(f"layers.{i}", layer) for i, layer in enumerate(bb.layers)] + [("head", head)]
    for prefix, part in parts:  # one part at a time: the float32 placeholders never exist whole
        part.to_empty(device=device).to(dtype)
        _fill(part, prefix, gen)
    return bb.eval(), head.eval()


def quantized_copy(bb: Backbone, fmt: str) -> Backbone:
    """A backbone whose decoder layers are `fmt` copies of `bb`'s, quantized by the loader's own entry
    point; the small parts (embedding, norm, projectors) are `bb`'s own modules, shared."""
    from nextstep_core.weights.convention import quantize_layer
    with torch.device("meta"):
        qb = Backbone(bb.cfg)
    for name, child in bb.named_children():
        if name != "layers":
            setattr(qb, name, child)
    layers = []
    for layer in bb.layers:
        c = copy.deepcopy(layer)
        c.to(bb.weights_device())  # a move drops the fused layouts the copy inherited (they held bb's bytes)
        layers.append(quantize_layer(c, fmt))
    qb.layers = nn.ModuleList(layers)
    return qb.eval()


def write_dequantized(qb: Backbone, bb: Backbone) -> int:
    """Make `bb`'s matrices the dequantized weights of `qb`'s (in `bb`'s dtype), so `bb` computes the
    reference product of the same weights. Each quantized module's own `dequantized` product is
    asked for the identity matrix (bias off): that returns its weight, exactly as it dequantizes
    it. Returns the number of matrices written; a module without `dequantized` raises."""
    n = 0
    for qlayer, layer in zip(qb.layers, bb.layers):
        for name, ref in layer.named_modules():
            q = qlayer.get_submodule(name) if name else qlayer
            if type(ref) is not nn.Linear or isinstance(q, nn.Linear):
                continue
            eye = torch.eye(ref.in_features, dtype=ref.weight.dtype, device=ref.weight.device)
            bias, q.bias = q.bias, None
            try:
                w = q.dequantized(eye).t()
            finally:
                q.bias = bias
            ref.weight.data.copy_(w)
            n += 1
    if not n:
        raise RuntimeError("no quantized matrix found in the quantized copy")
    return n


def module_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def bytes_per_token(bb: Backbone, head: FlowHead, steps: int) -> int:
    """What one image token must read from memory: every decoder matrix and the projectors once, the
    head's x-path once per step, its adaLN and condition weights once, and the KV cache of 2 rows
    over the image's average attended length."""
    net = head.net
    xpath = module_bytes(net.input_proj, net.final_layer.linear, *[b.mlp for b in net.res_blocks])
    once = module_bytes(net.cond_embed, net.final_layer.adaLN_modulation, *[b.adaLN_modulation for b in net.res_blocks])
    kv = bb.cache_bytes(2, PROMPT + IMAGE_TOKENS // 2)
    return (module_bytes(bb.layers, bb.image_in_projector, bb.image_out_projector, bb.norm) + xpath * steps
            + once + kv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written (the rate a
    bandwidth-bound kernel can read at)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - t0) / 1e9


def host_bandwidth(device: torch.device, nbytes: int, repeats: int = 3) -> float | None:
    """GB/s of a page-locked host-to-device copy (what a streamed layer crosses PCIe at); None off CUDA."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    sync(device)
    return nbytes * repeats / (time.perf_counter() - t0) / 1e9


class Enough(Exception):
    """Raised from the token callback once the tokens a row needs are done."""


@dataclass
class ImageRun:
    tokens: torch.Tensor              # [1, COMPARE, token_dim] float32, on the CPU
    prefill_s: float
    ms_per_token: float | None        # None when no tokens were timed
    peak_gb: float | None             # None off CUDA

    def speed(self, weights: str, path: str, floor_ms: float) -> dict:
        return dict(weights=weights, path=path, ms_per_token=self.ms_per_token, floor_ms=floor_ms,
                    s_per_image=None if self.ms_per_token is None else
                    self.prefill_s + IMAGE_TOKENS * self.ms_per_token / 1000,
                    prefill_s=self.prefill_s, peak_gb=self.peak_gb)


def prompt_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, min(vocab, 500), (2, PROMPT), generator=make_generator(1))


def run_image(bb: Backbone, head: FlowHead, steps: int, graphs: str, timed: int = 0) -> ImageRun:
    """One 512x512 image as the pipeline runs it (prompt prefill, then the token loop with the image's
    whole cache), stopped after the first COMPARE tokens, or after `timed` more tokens past the first
    two (which include capture and first kernel uses) when timing."""
    dev = bb.device
    s = SamplingSettings(cfg=CFG, steps=steps)
    ids = prompt_ids(bb.cfg.vocab_size).to(dev)
    stop = max(COMPARE, 2 + timed) if timed else COMPARE
    stamps, kept = [], {}

    def callback(done, total, tokens):
        if done == COMPARE:
            kept["tokens"] = tokens[:, :COMPARE].clone()  # on the device: no sync inside the timed tokens
        if timed and done in (2, 2 + timed):
            sync(dev)
            stamps.append(time.perf_counter())
        if done == stop:
            raise Enough
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t0 = time.perf_counter()
    cache = bb.new_cache(2, bb.padded_cache_len(PROMPT + IMAGE_TOKENS, False))
    hidden = bb.prefill(bb.embed(ids), torch.ones_like(ids), cache, PROMPT)[:, -1]
    sync(dev)
    prefill = time.perf_counter() - t0
    noise = noise_for(s, make_generator(0), 1, 1, bb.cfg.token_dim, dev, IMAGE_TOKENS)
    try:
        loop = TokenLoop(bb, head, s, Execution(cuda_graphs=graphs))
        loop.run(hidden, cache, 2, IMAGE_TOKENS, noise, callback=callback)
    except Enough:
        pass
    per = (stamps[1] - stamps[0]) / timed * 1000 if timed else None
    peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    return ImageRun(kept["tokens"].float().cpu(), prefill, per, peak)


def token_errors(got: torch.Tensor, want: torch.Tensor) -> list[float]:
    """||got - want|| / ||want|| per image token (the worst row), for the first COMPARE tokens."""
    err = (got.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1).clamp(min=1e-12)
    return [float(e) for e in err.amax(dim=0)]


@dataclass
class Figures:
    """What a row measured; its comparisons decide ok or FAIL."""
    values: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)

    def compare(self, label: str, got: torch.Tensor, want: torch.Tensor, bound: float) -> bool:
        errs = token_errors(got, want)
        worst = max(errs) if all(e == e for e in errs) else float("nan")
        ok = worst <= bound  # NaN is never within
        self.values.setdefault("comparisons", {})[label] = dict(max=worst, bound=bound, per_token=errs, ok=ok)
        print(f"    {label}: max token error {worst:.2e} over {len(errs)} tokens (bound {bound:g})"
              f"{'' if ok else '  <- out of bounds'}", flush=True)
        if not ok:
            self.failed.append(f"{label}: {worst:.2e} > {bound:g}")
        return ok

    def check(self, label: str, ok: bool, detail: str) -> None:
        self.values.setdefault("checks", {})[label] = dict(ok=bool(ok), detail=detail)
        print(f"    {label}: {detail}{'' if ok else '  <- FAIL'}", flush=True)
        if not ok:
            self.failed.append(f"{label}: {detail}")

    def speed(self, entry: dict) -> None:
        self.values.setdefault("speed", []).append(entry)
        ms = entry["ms_per_token"]
        extra = "" if ms is None else (f"{ms:.2f} ms/token (floor {entry['floor_ms']:.2f}), "
                                       f"{entry['s_per_image']:.1f} s/image, ")
        peak = "" if entry["peak_gb"] is None else f", peak {entry['peak_gb']:.1f} GB"
        print(f"    {entry['weights']} {entry['path']}: {extra}prefill {entry['prefill_s']:.2f} s{peak}", flush=True)


@contextmanager
def fault(kind: str | None, bb: Backbone):
    """For the tests only (--fault): break the candidate path of a row on purpose. 'tokens' zeroes the
    projected image token every token step reads, as a step reading a buffer nobody wrote would (so
    the comparison must fail); 'raise' raises (so the row must fail and the next one still run)."""
    if kind == "raise":
        raise RuntimeError("fault injected with --fault")
    handle = None
    if kind == "tokens":
        handle = bb.image_in_projector.register_forward_hook(lambda m, args, out: out * 0)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


class PagedLayers:
    """A `Backbone.layer_runner` that pages like a host's memory manager does (ComfyUI's dynamic VRAM,
    in spirit): each decoder layer's weights stay in RAM and are copied to the device right before it
    runs; after it ran they point at the RAM copy again (still valid: nothing is copied back) through
    the module's own move, so whatever the layer laid out on the device is dropped with it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.layers_run = 0

    def __call__(self, layers, body) -> None:
        for i, layer in enumerate(layers):
            home = {id(p): p.data for p in layer.parameters()}
            for p in layer.parameters():
                p.data = p.data.to(self.device, copy=True)
            try:
                body(i, layer)
            finally:
                layer._apply(lambda t: home[id(t)])  # the move that drops fused layouts, without a copy back
            self.layers_run += 1


def sdpa_backends(fn) -> dict:
    """{backend: calls} of the SDPA kernels `fn` ran, from the profiler's names for the ops that
    scaled_dot_product_attention dispatches to."""
    from torch.profiler import ProfilerActivity, profile
    names = (("_flash_attention_for_cpu", "flash (cpu)"), ("_flash_attention", "flash"),
             ("_efficient_attention", "efficient"), ("_cudnn_attention", "cudnn"),
             ("_attention_math_for_mps", "math (mps)"), ("_attention_math", "math"),
             ("_fused_attention_overrideable", "overrideable"))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found: dict = {}
    for e in prof.events():
        if e.name.startswith("aten::_scaled_dot_product"):
            label = next((lab for key, lab in names if e.name.endswith(key)), e.name)
            found[label] = found.get(label, 0) + 1
    return found


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
