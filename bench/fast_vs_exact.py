"""How far the fast token step moves each image token from the bit-parity (`exact`) step.

    python bench/fast_vs_exact.py              # tiny widths: 64 x 2 layers, head 64 x 2, 64 tokens
    python bench/fast_vs_exact.py --small      # hidden 512 x 8 layers, head 512 x 6, 256 tokens
    python bench/fast_vs_exact.py --static     # the fast side runs the capturable step (whole-cache attention)

Teacher-forced, in lockstep: both paths start from one prefill, sample every token from their own
state with the same noise, and then both are fed the exact path's token, so each token's
difference is what the fast path adds at that token (free-running random models are chaotic and
would measure the chaos instead). Prints the max and mean absolute token difference.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_ops import build  # noqa: E402
from nextstep_core.engine import Execution, SamplingSettings, TokenLoop, noise_for  # noqa: E402
from nextstep_core.noise import make_generator  # noqa: E402


@torch.inference_mode()
def lockstep(bb, head, n_tokens: int, settings: SamplingSettings, static: bool = False, prompt: int = 12,
             cfg_mult: int = 2, seed: int = 0, images: int = 1) -> torch.Tensor:
    """[n_tokens] max |fast token - exact token| per token, teacher-forced, for `images` images
    (different prompts) of `cfg_mult` CFG rows each."""
    gen = torch.Generator().manual_seed(seed)
    rows = cfg_mult * images
    ids = torch.randint(0, 200, (rows, prompt), generator=gen)
    cache_e = bb.new_cache(rows, prompt + n_tokens)
    h_e = bb.prefill(bb.embed(ids), torch.ones_like(ids), cache_e, None)[:, -1]
    cache_f, h_f = copy.deepcopy(cache_e), h_e.clone()
    le, lf = TokenLoop(bb, head, settings, Execution(exact=True)), TokenLoop(bb, head, settings)
    le.schedule(rows, n_tokens, bb.device, cfg_mult)
    lf.schedule(rows, n_tokens, bb.device, cfg_mult)
    noise = noise_for(settings, make_generator(seed), 1, rows // cfg_mult, bb.cfg.token_dim, bb.device, n_tokens)
    pos = torch.tensor([cache_f.length])
    out = []
    for k in range(n_tokens):
        z = noise.for_token(k)
        t_e = le.sample_token(h_e, z, le.scales[k], cfg_mult)
        t_f = lf.sample_token(h_f, z, lf.scales[k], cfg_mult)
        out.append((t_f.float() - t_e.float()).abs().max())
        e = bb.image_in_projector(t_e).repeat(cfg_mult, 1)[:, None]
        h_e = bb.step(e, cache_e, None)[:, -1]
        if static:
            h_f = bb.step_at(e, cache_f, pos, fast=True)[:, -1]
            pos += 1
        else:
            h_f = bb.step(e, cache_f, cache_f.length + 1, fast=True)[:, -1]
    return torch.stack(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--sampler", default="nextstep1")
    ap.add_argument("--static", action="store_true")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)
    if args.small:
        bb, head = build(layers=8, heads=8, kv=2, head_dim=64, mlp=1536, head_width=512, head_layers=6, dtype=dtype)
        n = args.tokens or 256
    else:
        bb, head = build(layers=2, heads=4, kv=2, head_dim=16, mlp=128, head_width=64, head_layers=2, dtype=dtype)
        n = args.tokens or 64
    s = SamplingSettings(steps=args.steps, cfg=args.cfg, sampler=args.sampler, use_norm=False)
    d = lockstep(bb, head, n, s, static=args.static)
    print(f"{'small' if args.small else 'tiny'} model, {args.dtype}, {n} tokens, {args.steps} steps ({args.sampler}), "
          f"cfg {args.cfg}, fast side: {'capturable step' if args.static else 'eager step'}")
    print(f"max |fast - exact| per token: max {d.max():.3g}, mean {d.mean():.3g}, first token {d[0]:.3g}")


if __name__ == "__main__":
    main()
