"""Ops per image token of the captured step (`StaticStep.body`), counted at the dispatcher.

    python bench/step_ops.py                  # real depth (48 layers, head 12 blocks, 28 steps), narrow widths
    python bench/step_ops.py --exact          # the bit-parity path
    python bench/step_ops.py --quant int8     # 8-bit backbone weights
    python bench/step_ops.py --compiled       # + kernels of the inductor-compiled step (slow to compile)
    python bench/step_ops.py --eager --layers 8 --heads 8 --kv 2 --head-layers 6
                                              # the CLI's default path on a CPU (no CUDA graph), small model

The number of ops a step dispatches depends on the depth, the step count and the code path, not on
the widths, so the model is built at the real depth with narrow layers and runs in a second on a
CPU. "ops" counts every aten call; "kernels" leaves out views (no work, no launch on a GPU);
GEMMs are the matrix products. On CUDA the attention counts differ with the SDPA backend picked
(one fused op, or the math path's ~10), which is why the GPU script prints the backend it gets.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nextstep_core.backbone import Backbone  # noqa: E402
from nextstep_core.config import BackboneConfig, FlowHeadConfig  # noqa: E402
from nextstep_core.engine import Execution, SamplingSettings, TokenLoop  # noqa: E402
from nextstep_core.flow_head import FlowHead  # noqa: E402
from nextstep_core.graphs import StaticStep  # noqa: E402
from nextstep_core.samplers import draws_per_token  # noqa: E402

GEMMS = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "_weight_int8pack_mm", "_scaled_mm",
         "_int_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu"}
FULL_DEPTH = dict(layers=48, heads=40, kv=8, head_layers=12)


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name while active."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if func.is_view or name in ("alias", "detach", "lift_fresh"):
            self.views += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return self.total - self.views

    @property
    def gemms(self) -> int:
        return sum(n for k, n in self.ops.items() if k in GEMMS)


def count(fn) -> OpCounter:
    counter = OpCounter()
    with counter:
        fn()
    return counter


def build(layers=4, heads=8, kv=2, head_dim=16, mlp=96, head_width=64, head_layers=2, dtype=torch.float32,
          quant=None, seed=0):
    """A random backbone + flow head of the given depth (widths only need to be valid)."""
    g = torch.Generator().manual_seed(seed)
    hidden = heads * head_dim
    cfg = BackboneConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                         intermediate_size=mlp, vocab_size=256, rms_norm_eps=1e-6, rope_theta=1e6)
    bb = Backbone(cfg)
    head = FlowHead(FlowHeadConfig(64, hidden, head_width, head_layers))
    for m in (bb, head):
        for p in m.parameters():
            p.data = (torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5)).to(dtype)
    if quant:
        from nextstep_core.weights.convention import quantize_backbone
        quantize_backbone(bb, quant)
    return bb.eval(), head.eval()


def make_step(bb, head, settings: SamplingSettings, execution: Execution = Execution(), rows=2, cfg_mult=2,
              prompt=8, n_tokens=16):
    """A prefilled cache and the StaticStep of its first image token, as `graphed_loop` makes it."""
    ids = torch.randint(0, 200, (rows, prompt), generator=torch.Generator().manual_seed(1))
    cache = bb.new_cache(rows, bb.padded_cache_len(prompt + n_tokens, execution.exact))
    hidden = bb.prefill(bb.embed(ids), torch.ones_like(ids), cache, None if execution.exact else prompt)[:, -1]
    loop = TokenLoop(bb, head, settings, execution)
    loop.schedule(rows, n_tokens, hidden.device, cfg_mult)
    shape = (draws_per_token(settings.sampler, settings.steps), rows // cfg_mult, bb.cfg.token_dim)
    step = StaticStep(loop, hidden, cache, cfg_mult, shape)
    step.noise.normal_(generator=torch.Generator().manual_seed(2))
    step.scale.copy_(torch.tensor([7.5, 1.0]))
    return step


def step_counts(step: StaticStep) -> dict:
    """Ops of one step body, and of its two halves (flow head + sampler; backbone step)."""
    loop, bb = step.loop, step.loop.bb
    step.body()  # warm-up, as before a capture: one-time work (fusing weights, tables) is not per token
    whole = count(step.body)
    head = count(lambda: loop.sample_token(step.hidden, step.noise, step.scale, step.cfg_mult))
    tok = loop.sample_token(step.hidden, step.noise, step.scale, step.cfg_mult)
    e = bb.image_in_projector(tok).repeat(step.cfg_mult, 1)
    backbone = count(lambda: bb.step_at(e[:, None], step.cache, step.pos, fast=not loop.execution.exact))
    return dict(whole=whole, head=head, backbone=backbone)


def eager_counts(step: StaticStep) -> dict:
    """Ops of one image token as `TokenLoop.run` computes it without a CUDA graph (the CLI's default
    on a CPU): the head, the feedback projection, and `Backbone.step` over the filled cache."""
    loop, bb, cache, cfg_mult = step.loop, step.loop.bb, step.cache, step.cfg_mult
    cache.length = int(step.pos)

    def token():
        tok = loop.sample_token(step.hidden, step.noise, step.scale, cfg_mult)
        e = bb.image_in_projector(tok).repeat(cfg_mult, 1)
        return tok, e

    token()  # warm-up, as in step_counts
    bb.step(token()[1][:, None], cache, loop._kv(cache, 1), fast=not loop.execution.exact)
    head = count(lambda: loop.sample_token(step.hidden, step.noise, step.scale, cfg_mult))
    whole = count(lambda: bb.step(token()[1][:, None], cache, loop._kv(cache, 1), fast=not loop.execution.exact))
    e = token()[1]
    backbone = count(lambda: bb.step(e[:, None], cache, loop._kv(cache, 1), fast=not loop.execution.exact))
    return dict(whole=whole, head=head, backbone=backbone)


def compiled_kernels(step: StaticStep) -> int:
    """Kernels the inductor-compiled step body launches per call: its generated (fused) kernels
    plus the library calls it leaves in place (matrix products, attention), read from the wrapper
    code inductor writes (its graph cache is bypassed so the code is generated here)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._inductor import graph as ind_graph
    torch._dynamo.reset()
    calls = Counter()
    orig = ind_graph.GraphLowering.codegen

    def codegen(self, *a, **k):
        out = orig(self, *a, **k)
        calls.update(type(line).__name__ for line in self.wrapper_code.lines)
        return out
    ind_graph.GraphLowering.codegen = codegen
    cache = inductor_config.fx_graph_cache
    inductor_config.fx_graph_cache = False
    try:
        torch.compile(step.body, backend="inductor", fullgraph=True, dynamic=False)()
    finally:
        ind_graph.GraphLowering.codegen = orig
        inductor_config.fx_graph_cache = cache
    return calls["KernelCallLine"] + calls["ExternKernelOutLine"] + calls["ExternKernelAllocLine"]


def table(rows) -> str:
    out = ["| path | ops/token | kernels/token (no views) | GEMMs | head ops | backbone ops | per layer | per head step |",
           "|---|---|---|---|---|---|---|---|"]
    for name, c, layers, steps in rows:
        out.append(f"| {name} | {c['whole'].total} | {c['whole'].kernels} | {c['whole'].gemms} | "
                   f"{c['head'].total} | {c['backbone'].total} | {c['backbone'].total / layers:.1f} | "
                   f"{c['head'].total / steps:.1f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=FULL_DEPTH["layers"])
    ap.add_argument("--head-layers", type=int, default=FULL_DEPTH["head_layers"])
    ap.add_argument("--heads", type=int, default=FULL_DEPTH["heads"])
    ap.add_argument("--kv", type=int, default=FULL_DEPTH["kv"])
    ap.add_argument("--eager", action="store_true", help="count the eager step (no CUDA graph): the CLI's default on a CPU")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--sampler", default="nextstep1")
    ap.add_argument("--quant", choices=["int8", "fp8"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--exact", action="store_true", help="count only the bit-parity path")
    ap.add_argument("--compiled", action="store_true", help="also count the kernels of the compiled step")
    ap.add_argument("--top", type=int, default=0, help="list the N most frequent ops of each path")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dtype = getattr(torch, args.dtype)
    bb, head = build(layers=args.layers, heads=args.heads, kv=args.kv, head_dim=4,
                     head_layers=args.head_layers, dtype=dtype, quant=args.quant)
    print(f"torch {torch.__version__}; {args.layers} layers (GQA {args.heads}/{args.kv}), "
          f"head {args.head_layers} blocks, {args.steps} steps ({args.sampler}), 2 CFG rows, "
          f"{args.dtype}{' + ' + args.quant if args.quant else ''}, CPU, {'eager' if args.eager else 'captured'} step")
    rows = []
    with torch.inference_mode():
        for exact in ((True,) if args.exact else (False, True)):
            s = SamplingSettings(steps=args.steps, sampler=args.sampler)
            step = make_step(bb, head, s, Execution(exact=exact))
            c = eager_counts(step) if args.eager else step_counts(step)
            rows.append(("exact" if exact else "fast", c, args.layers, args.steps))
            if args.top:
                print(f"{'exact' if exact else 'fast'}: " + ", ".join(f"{k} {n}" for k, n in c["whole"].ops.most_common(args.top)))
    print(table(rows))
    if args.compiled:
        with torch.inference_mode():
            step = make_step(bb, head, SamplingSettings(steps=args.steps, sampler=args.sampler))
            step.body()  # eager first: lays out the fused weights the compiled code reads
            print(f"\ncompiled fast step (inductor, CPU): {compiled_kernels(step)} kernels/token")


if __name__ == "__main__":
    main()
