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

The "core" rows are what ComfyUI 0.33 computes with the same files (comfy/ops.py, comfy-kitchen):
int8_tensorwise quantizes each activation row to int8 at run time (W8A8); float8_e4m3fn, on GPUs
with fp8 matmuls, casts activations to e4m3 with scale 1 (clamped at +-448; the pack's files carry
no input_scale), and on other GPUs multiplies with the dequantized weights (the "pack fp8" row);
asym_w4a8_int8 is core's own 4-bit (comfy-kitchen's defaults: group 16, ConvRot 256, fp8 group
scales, a Lloyd-Max codebook). They run on comfy-kitchen's eager backend where it is installed;
without it, int8 and fp8 run an exact re-implementation of the same arithmetic (written here from
comfy-kitchen's eager code) and the 4-bit row is left out.
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
from nextstep_core.weights.convention import module_from_stored, quantize_backbone, quantize_stored  # noqa: E402
from nextstep_core.weights.quant import LINEARS, empty_quantized_layers, quantized_names  # noqa: E402
from nextstep_core.tiny import write_tiny  # noqa: E402
from bench.token_error import relative_error, teacher_forced  # noqa: E402

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


def kitchen():
    try:
        import comfy_kitchen.tensor as ck_tensor
        from importlib.metadata import version
        return ck_tensor, version("comfy-kitchen")
    except ImportError:
        return None, None


class CoreLinear(torch.nn.Module):
    """One decoder matrix as ComfyUI 0.33 computes it from the pack's file (`stored`: the file's
    tensors, weights/convention.py)."""

    def __init__(self, fmt, stored, bias, ck=None, weight=None):
        super().__init__()
        self.fmt, self.ck, self.bias = fmt, ck, bias
        self.q, self.scale = stored["weight"], stored["weight_scale"]
        self.qt = None
        if ck is not None and fmt == "w4a8":
            self.qt = ck.QuantizedTensor.from_float(weight, "AsymW4A8Int8Layout", group_size=16, convrot_groupsize=256)
        elif ck is not None:
            name = {"int8": "TensorWiseINT8Layout", "fp8": "TensorCoreFP8Layout"}[fmt]
            params = ck.get_layout_class(name).Params(scale=self.scale, orig_dtype=bias.dtype if bias is not None
                                                      else torch.float32, orig_shape=tuple(self.q.shape))
            self.qt = ck.QuantizedTensor(self.q, name, params)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._kitchen(x2) if self.qt is not None else self._same_arithmetic(x2)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _kitchen(self, x2):
        qt = self.qt.to(x2.dtype)  # ComfyUI casts the layer to the compute dtype (the params' dtype only)
        if self.fmt == "fp8":
            one = torch.ones((), dtype=torch.float32)
            params = self.ck.TensorCoreFP8Layout.Params(scale=one, orig_dtype=x2.dtype, orig_shape=tuple(x2.shape))
            x2 = self.ck.QuantizedTensor(self.ck_fp8(x2), "TensorCoreFP8Layout", params)
        bias = None if self.bias is None else self.bias.to(qt.dtype)
        return torch.nn.functional.linear(x2, qt, bias)

    @staticmethod
    def ck_fp8(x):
        import comfy_kitchen as ck
        return ck.quantize_per_tensor_fp8(x, torch.ones((), dtype=torch.float32), torch.float8_e4m3fn)

    def _same_arithmetic(self, x2):
        """comfy-kitchen 0.2.31's eager int8_linear / fp8 path, written out."""
        if self.fmt == "int8":
            s = (x2.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp(min=1e-30)
            div = s.to(x2.dtype)
            div = torch.where(div == 0, torch.full_like(div, torch.finfo(x2.dtype).tiny), div)
            xq = (x2 / div).round_().clamp_(-128, 127).to(torch.int8)
            acc = (xq.to(torch.float64) @ self.q.to(torch.float64).t())  # exact: int32 sums fit a double
            y = (acc.float() * (s * self.scale.reshape(1, -1).float())).to(x2.dtype)
        else:
            xq = (x2 * torch.ones((), dtype=x2.dtype)).clamp(-448, 448).to(torch.float8_e4m3fn)
            y = torch.nn.functional.linear(xq.to(x2.dtype), (self.q.to(x2.dtype) * self.scale.to(x2.dtype)))
        return y if self.bias is None else y + self.bias.to(y.dtype)


def with_matrices(bb, make):
    """A copy of `bb` whose decoder matrices are `make(weight in float32, bias or None)`."""
    q = copy.deepcopy(bb)
    for layer in q.layers:
        for path in LINEARS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            lin = getattr(parent, name)
            setattr(parent, name, make(lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach()))
    return q


def core_backbone(bb, fmt, ck):
    """A copy of `bb` whose decoder matrices compute as ComfyUI 0.33 does with a file of `fmt`."""
    def make(w, bias):
        stored = quantize_stored(w, fmt) if fmt != "w4a8" else {"weight": None, "weight_scale": None}
        return CoreLinear(fmt, stored, bias, ck, w)
    return with_matrices(bb, make)


def per_row_fp8(bb):
    """The pack's earlier fp8: one scale per output row."""
    def make(w, bias):
        rows = torch.where(w.abs().amax(dim=1) > 0, w.abs().amax(dim=1) / 448, torch.ones(w.shape[0]))
        stored = {"weight": (w / rows[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn),
                  "weight_scale": rows[:, None]}
        return module_from_stored("fp8", stored, bias)
    return with_matrices(bb, make)


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
        ck, ck_version = kitchen()
        how = f"comfy-kitchen {ck_version} eager" if ck is not None else "same arithmetic, re-implemented"
        variants = [("pack int8 (weight-only, scale per row: the CLI)", "int8", "off"),
                    ("pack fp8, one scale per matrix, dequantized (current files; core fp8 without fp8 matmuls)",
                     "fp8", "off"),
                    ("pack fp8, scale per row, dequantized (earlier files)", "fp8", "per-row"),
                    ("pack fp8 matmul (fp8 activations per row)", "fp8", "auto"),
                    (f"core int8_tensorwise, W8A8 ({how})", "int8", "core"),
                    (f"core float8_e4m3fn, fp8 activations at scale 1 ({how})", "fp8", "core"),
                    ("int4 (group 128; kernel, bf16 activations)", "int4", "int4-kernel"),
                    ("int4 (dequantized; the registered ComfyUI layout computes this)", "int4", "int4-off"),
                    (f"core asym_w4a8_int8 (comfy-kitchen {ck_version} eager, group 16)", "int4", "core-w4a8")]
        asked = os.environ.get("NEXTSTEP_FP8_MATMUL", "auto")
        import nextstep_core.weights.int4 as int4
        int4.GROUP = args.int4_group
        variants = [(n.replace("group 128", f"group {args.int4_group}"), f, m) for n, f, m in variants
                    if not args.only or f in args.only.split(",")]
        for name, fmt, mm in variants:
            os.environ["NEXTSTEP_FP8_MATMUL"] = asked if mm == "auto" else "off" if mm.startswith("int4") else \
                "off" if mm in ("off", "per-row") else asked
            os.environ["NEXTSTEP_INT4_MATMUL"] = "off" if mm == "int4-off" else "auto"
            if mm == "core-w4a8":
                if ck is None or bb.cfg.hidden_size % 256 or bb.cfg.intermediate_size % 256:
                    continue  # comfy-kitchen's W4A8 rotates groups of 256 inputs
                q = core_backbone(bb, "w4a8", ck)
            elif mm == "core":
                q = core_backbone(bb, fmt, ck)
            elif mm == "per-row":
                q = per_row_fp8(bb)
            else:
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
    print("\nWeights at the 14B shapes (GB = 1e9 bytes; bf16 for everything not quantized):\n")
    print("| format | decoder matrices (+ scales) | embeddings, norms, biases, projectors | LM head | flow head | "
          "file with LM head | without |")
    print("|---|---|---|---|---|---|---|")
    for fmt in (None, "int8", "fp8", "int4"):
        layers, rest, lm, fh = (b / 1e9 for b in weight_bytes(fmt))
        print(f"| {fmt or 'bf16'} | {layers:.2f} | {rest:.2f} | {lm:.2f} | {fh:.2f} | {layers + rest + lm + fh:.2f} | "
              f"{layers + rest + fh:.2f} |")


if __name__ == "__main__":
    main()
