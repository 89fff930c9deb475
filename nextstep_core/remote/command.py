"""`python -m nextstep_core generate --server URL ...`: the local command's options and output
names, drawn by vLLM-Omni servers. Unset options take NextStep-1.1's settings (what they serve)."""
from __future__ import annotations

import sys
import time

from ..errors import SettingsError
from ..outputs import output_paths, save_png
from ..presets import preset

# (option, its value when not given): settings only a local run has
LOCAL_ONLY = (("--vae", None), ("--tokens-out", None), ("--exact", False), ("--quant", None), ("--gpu-layers", None),
              ("--compile", False), ("--device", "auto"), ("--dtype", "auto"), ("--self-cot", "off"),
              ("--reasoning", None))


def check_args(args) -> None:
    if args.command != "generate":
        raise SettingsError(f"`{args.command}` runs locally only: vLLM-Omni serves NextStep-1.1 text-to-image. "
                            "Leave out --server.")
    for option, unset in LOCAL_ONLY:
        if getattr(args, option[2:].replace("-", "_"), unset) != unset:
            raise SettingsError(f"{option} is an option of a local run; with --server the server decides. Leave "
                                f"out {option} or --server.")
    if args.sampler not in (None, "nextstep1.1"):
        raise SettingsError(f"--sampler {args.sampler} runs locally only; vLLM-Omni samples with NextStep-1.1's own "
                            "sampler (nextstep1.1). Leave out --sampler or --server.")


def run_remote(args) -> int:
    from ..engine import SamplingSettings
    from ..pipeline import Request
    from . import DEFAULT_TIMEOUT, draw
    check_args(args)
    card = preset("nextstep1.1")
    pick = lambda value, key: card[key] if value is None else value
    req = Request(prompts=args.prompt, width=pick(args.width, "width"), height=pick(args.height, "height"),
                  positive=pick(args.positive, "positive"), negative=pick(args.negative, "negative"),
                  images_per_prompt=args.num_images, seed=pick(args.seed, "seed"),
                  sampling=SamplingSettings(cfg=pick(args.cfg, "cfg"), cfg_schedule=pick(args.cfg_schedule, "cfg_schedule"),
                                            steps=pick(args.steps, "steps"), shift=pick(args.shift, "shift"),
                                            use_norm=pick(args.use_norm, "use_norm"), sampler="nextstep1.1"))
    shown = [0.0]

    def progress(p):
        finished = sum(p.done) == sum(p.total)
        if not args.quiet and (finished or time.monotonic() - shown[0] >= 1.0):
            shown[0] = time.monotonic()
            print(f"\r{p.describe()}", end="\n" if finished else "", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = draw(args.server, req, model=args.model, timeout=DEFAULT_TIMEOUT if args.server_timeout is None else args.server_timeout,
                  on_progress=progress, typed=tuple(args.server))
    paths = output_paths(args.out, result.images.shape[0])
    for img, path in zip(result.images, paths):
        save_png(img, path)
    if not args.quiet:
        s = req.sampling
        print(f"{result.model} on {len(set(result.drawn_by))} server(s): {len(paths)} image(s) {req.width}x{req.height}, "
              f"cfg {s.cfg}, {s.steps} steps, seeds {result.seeds[0]}..{result.seeds[-1]}; "
              f"{time.perf_counter() - t0:.1f}s -> {', '.join(paths)}", file=sys.stderr)
    return 0
