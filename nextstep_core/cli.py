"""`python -m nextstep_core`: the same pipeline the nodes run, from a shell.

Unset generation options take the recommended values of the model's card (see presets.py), so
`generate --model DIR --prompt TEXT --out x.png` already does the right thing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import NextStepError
from .outputs import output_paths, save_png, save_tokens
from .presets import preset
from .progress_line import ProgressLine
from .weights.quant import FORMATS
from .samplers import CFG_SCHEDULES, sampler_names


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="NextStep model folder (or a Hugging Face repo id to download); with --server, "
                                   "the served model's name to check against")
    p.add_argument("--vae", help="VAE folder or file (default: the model folder's vae/)")
    p.add_argument("--prompt", action="append", default=[], help="prompt; repeat for a batch of prompts")
    p.add_argument("--positive", help="text appended to conditional prompts (default: the model card's)")
    p.add_argument("--negative", help="negative prompt (default: the model card's)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--cfg", type=float, help="text CFG scale (1 = off)")
    p.add_argument("--steps", type=int, help="flow-matching steps per image token")
    p.add_argument("--shift", type=float, help="timesteps shift (1 = none)")
    p.add_argument("--use-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="layer-normalise each sampled token (edit model: on)")
    p.add_argument("--cfg-schedule", choices=list(CFG_SCHEDULES))
    p.add_argument("--sampler", choices=sampler_names())
    p.add_argument("--seed", type=int)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the flow-head step (inductor; optional, first token pays the compile time)")
    p.add_argument("--gpu-layers", type=_gpu_layers,
                   help="low-VRAM mode: keep this many decoder layers on the GPU and stream the rest from RAM "
                        "every token (slower; the cost per token is printed); auto: as many as fit in free memory")
    p.add_argument("--quant", choices=list(FORMATS),
                   help="int8 / fp8 (about half the memory) or int4 (about a quarter) backbone weights: quantized "
                        "while loading a full-precision folder, or read from a pre-quantized .safetensors (see "
                        "`quantize`)")
    p.add_argument("--exact", action="store_true",
                   help="compute as StepFun's pipeline does (on CPU float32 its tokens up to float rounding; "
                        "slower: no attention trimming or batched adaLN)")
    p.add_argument("--out", required=True, help="output PNG (several images: NAME-0.png, NAME-1.png, ...)")
    p.add_argument("--tokens-out", help="safetensors file with `tokens` [B, h*w, 64] and `images` [B, H, W, 3]")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--server", action="append", help="draw on a vLLM-Omni server (base URL, http://host:8091); repeat "
                   "to spread the images over several. NextStep-1.1 text-to-image only")
    p.add_argument("--server-timeout", type=float, help="seconds one image may take on a server (default 1800)")


def _gpu_layers(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of layers (0 streams them all) or auto") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m nextstep_core", description="Run StepFun's NextStep-1 models.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    _common(g)
    g.add_argument("--self-cot", nargs="?", const="think", default="off", choices=["off", "think", "refine"],
                   help="let the model reason in text before drawing (think) or rewrite the prompt (refine)")
    g.add_argument("--reasoning", help="your own reasoning text instead of the model's (reproducible runs)")
    g.add_argument("--think-tokens", type=int, default=256, help="most reasoning tokens before the span is closed")
    g.add_argument("--temperature", type=float, default=0.0, help="reasoning sampling temperature (0 = greedy)")
    g.add_argument("--top-p", type=float, default=0.9)
    e = sub.add_parser("edit", help="edit an image with an instruction (NextStep-1-Large-Edit)")
    _common(e)
    e.add_argument("--image", action="append", required=True, help="input image; repeat for a batch")
    e.add_argument("--cfg-img", type=float, help="image CFG scale (1 = off)")
    e.add_argument("--fit", choices=["bucket", "center-crop", "resize", "none"],
                   help="how the input image is fitted. With --width/--height (default resize): resize = exactly "
                        "that size, as StepFun's example; bucket/center-crop = cover it and centre-crop; none = the "
                        "input as it is. Without a size (default bucket): the nearest official aspect bucket at "
                        "--fit-size, and the output has the fitted size")
    e.add_argument("--fit-size", type=int, help="base size for --fit when no --width/--height is given (512)")
    b = sub.add_parser("storyboard", help="panels that continue one story (each sees the panels before it)")
    _common(b)
    b.add_argument("--panel", action="append", default=[], help="a panel prompt; repeat, in story order")
    b.add_argument("--style", default="", help="character/style text put before every panel prompt")
    q = sub.add_parser("quantize", help="write the backbone (plus LM head and flow head) as one int8/fp8/int4 "
                                        ".safetensors in ComfyUI's convention for quantized layers")
    q.add_argument("--model", required=True, help="full-precision NextStep model folder (or a Hugging Face repo id), "
                                                 "or a pre-quantized file of an earlier version to write again")
    q.add_argument("--format", choices=list(FORMATS), dest="fmt",
                   help="int8 (ComfyUI's int8_tensorwise), fp8 (e4m3, one scale per matrix: ComfyUI's "
                        "float8_e4m3fn) or int4 (the pack's group-wise format); optional when --model is a "
                        "pre-quantized file being written again in the current layout")
    q.add_argument("--out", required=True, help="the .safetensors to write; put it next to the model's tokenizer files")
    q.add_argument("--device", default="cpu", help="where to quantize (cpu needs about 16 GB of RAM at 14B)")
    q.add_argument("--no-lm-head", action="store_true", help="leave out the LM head (1.5 GB at 14B; Self-CoT needs it)")
    q.add_argument("--force", action="store_true", help="replace an existing file")
    t = sub.add_parser("tiny", help="write a tiny random checkpoint in the official layout (tests, smoke runs)")
    t.add_argument("out")
    t.add_argument("--edit", action="store_true", help="use the Edit repo's VAE config dialect")
    t.add_argument("--v11", action="store_true", help="use the NextStep-1.1 config dialect")
    t.add_argument("--shards", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="replace an existing folder")
    return ap


def resolve_model(name: str) -> str:
    """A local folder or file, or a Hub repo id (`owner/name`) fetched into the Hugging Face
    cache (only when asked for, never at import)."""
    import re
    if os.path.exists(name) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        return name
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise NextStepError(f"{name!r} is not a folder here, and huggingface_hub is not installed to download "
                            "it: pip install huggingface_hub, or download the repo and pass its folder.") from None
    try:
        return snapshot_download(name)
    except Exception as exc:
        raise NextStepError(f"{name!r} is not a folder here and could not be downloaded from the Hugging Face Hub "
                            f"({type(exc).__name__}: {exc}). Download it yourself and pass the folder.") from None


def run_generation(args) -> int:
    if args.server:
        from .remote.command import run_remote
        return run_remote(args)
    if not args.model:
        raise NextStepError("--model is required: a NextStep model folder or Hugging Face repo id (or --server URL).")
    from .checkpoint import load_backbone, load_flow_head, load_vae, model_variant
    from .devices import resolve_device, resolve_dtype
    from .engine import Execution, SamplingSettings
    from .images import open_image
    from .pipeline import NextStepPipeline, Request

    from .variants import EDIT_VARIANT
    model = resolve_model(args.model)
    variant = model_variant(model)
    if args.command == "edit" and variant != EDIT_VARIANT:
        variant = EDIT_VARIANT  # editing settings, whatever the folder is called
    card = preset(variant)
    pick = lambda value, key: card[key] if value is None else value
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    # low-VRAM mode reads the backbone into RAM and moves only the layers that stay (see weights/streaming.py)
    backbone, tok = load_backbone(model, "cpu" if args.gpu_layers is not None else device, dtype, quant=args.quant)
    pipe = NextStepPipeline(backbone, tok, load_flow_head(model, device, dtype), load_vae(args.vae or model, device, dtype))
    load_s = time.perf_counter() - t0
    editing = args.command == "edit"
    if args.command == "storyboard":
        args.prompt = args.prompt or []
    elif not args.prompt:
        raise NextStepError("No prompt given: add --prompt TEXT.")
    settings = SamplingSettings(
        cfg=pick(args.cfg, "cfg"), cfg_img=pick(getattr(args, "cfg_img", None), "cfg_img") if editing else 1.0,
        cfg_schedule=pick(args.cfg_schedule, "cfg_schedule"), steps=pick(args.steps, "steps"),
        shift=pick(args.shift, "shift"), use_norm=pick(args.use_norm, "use_norm"), sampler=pick(args.sampler, "sampler"))
    execution = Execution(exact=args.exact, compile="inductor" if args.compile else None)
    kw = dict(prompts=args.prompt, positive=pick(args.positive, "positive"), negative=pick(args.negative, "negative"),
              width=pick(args.width, "width"), height=pick(args.height, "height"),
              images_per_prompt=args.num_images, seed=pick(args.seed, "seed"), sampling=settings, execution=execution)
    if args.command == "generate":
        from .reasoning import ReasoningSettings
        mode = "think" if args.reasoning is not None and args.self_cot == "off" else args.self_cot
        kw["reasoning"] = ReasoningSettings(mode=mode, max_tokens=args.think_tokens, temperature=args.temperature,
                                            top_p=args.top_p, text=args.reasoning)
    elif editing:
        kw.update(width=args.width or None, height=args.height or None, edit_images=[open_image(p) for p in args.image])
        if (args.width is None) != (args.height is None):
            raise NextStepError("Give both --width and --height, or neither (then the output has the input's size).")
        sized = args.width is not None
        if sized and args.fit_size is not None:
            raise NextStepError(f"--fit-size {args.fit_size} applies only without --width/--height (the input is "
                                f"fitted to {args.width}x{args.height}); drop one of them.")
        kw.update(fit=args.fit or ("resize" if sized else "bucket"),
                  fit_base=512 if args.fit_size is None else args.fit_size)
    if args.command == "storyboard":
        from .story import StorySettings, Storyboard
        # the story checks its settings once, here; each panel adds only its prompt and seed
        req = StorySettings(kw["width"], kw["height"], settings, positive=kw["positive"], negative=kw["negative"],
                            style=args.style, execution=execution)
        prompts = [p for p in args.panel + args.prompt if p.strip()]
        shape = Storyboard(pipe).shape(Storyboard.start(req), panels=max(1, len(prompts)))
    else:
        req = Request(**kw)  # checks itself once, here, before any work
        shape = pipe.shape(req)
    if args.gpu_layers is not None:
        _stream(args, backbone, shape, req.execution, device)
    sync = _device_sync(device)
    progress = ProgressLine(sys.stderr, quiet=args.quiet, sync=sync)
    t1 = time.perf_counter()
    if args.command == "storyboard":
        return _storyboard(args, pipe, prompts, req, kw["seed"],
                           f"{variant} ({weights_note(backbone, model, args.quant)})", t1, sync)
    result = pipe.run(req, progress)
    gen_s = time.perf_counter() - t1
    paths = output_paths(args.out, result.images.shape[0])
    for img, path in zip(result.images, paths):
        save_png(img, path)
    if args.tokens_out:
        save_tokens(args.tokens_out, result.tokens, result.images)
    if not args.quiet and any(result.reasoning):
        for i, text in enumerate(result.reasoning):
            print(f"reasoning[{i}]: {text}", file=sys.stderr)
    if not args.quiet:
        n = result.tokens.shape[1]
        print(f"{variant}: {len(paths)} image(s) {result.images.shape[2]}x{result.images.shape[1]}, {n} tokens, "
              f"cfg {settings.cfg}, {settings.steps} steps, sampler {settings.sampler}; "
              f"{weights_note(backbone, model, args.quant)}; load {load_s:.1f}s, "
              f"generate {gen_s:.1f}s ({gen_s / n * 1000:.1f} ms/token) -> {', '.join(paths)}", file=sys.stderr)
    return 0


def _device_sync(device):
    """What waits for `device` before the progress line reads the time (None: nothing to wait for)."""
    import torch
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return None


def _stream(args, backbone, shape, execution, device) -> None:
    """Keep as many decoder layers on the device as memory.plan says fit (or --gpu-layers N)."""
    from .devices import free_bytes
    from .memory import bytes_on, plan
    from .weights.streaming import stream_layers
    from .weights.quant import format_of
    free = free_bytes(device)
    if free is not None:  # what the backbone already holds there is freed when it is placed
        free += bytes_on(backbone, device)
    layers = None if args.gpu_layers == "auto" else args.gpu_layers
    p = plan(backbone.cfg, format_of(backbone), backbone.dtype.itemsize, width=shape.width, height=shape.height,
             batch=shape.batch, cfg_rows=shape.cfg_rows, context_tokens=shape.context, free_bytes=free,
             gpu_layers=layers, lm_head=backbone.lm_head is not None or shape.writes_text,
             graphs=device.type == "cuda" and execution.cuda_graphs != "off")
    stream_layers(backbone, p.resident, device, p)
    if not args.quiet:
        print(f"low-VRAM mode: {p.describe()}", file=sys.stderr)


def _storyboard(args, pipe, prompts, story, seed, variant, t1, sync=None) -> int:
    import torch
    from .story import Storyboard
    progress = ProgressLine(sys.stderr, quiet=args.quiet, passes=len(prompts), sync=sync)
    panels = Storyboard(pipe).run(prompts, story, seed=seed,
                                  callback=lambda _panel, done, total, tokens: progress(done, total, tokens))
    images = torch.cat([p.image for p in panels])
    paths = output_paths(args.out, images.shape[0])
    for img, path in zip(images, paths):
        save_png(img, path)
    if args.tokens_out:
        save_tokens(args.tokens_out, torch.cat([p.tokens for p in panels]), images)
    if not args.quiet:
        print(f"{variant}: {len(panels)} panels, story of {panels[-1].context.length} tokens in "
              f"{time.perf_counter() - t1:.1f}s -> {', '.join(paths)}", file=sys.stderr)
    return 0


def run_quantize(args) -> int:
    import torch
    from .checkpoint import load_backbone
    from .devices import resolve_device
    from .weights.quant_file import file_format, is_earlier_layout
    from .weights.quant_write import save_quantized
    out = args.out
    if not out.endswith(".safetensors"):
        raise NextStepError(f"--out {out}: the file name must end in .safetensors.")
    if os.path.exists(out) and not args.force:
        raise NextStepError(f"{out} already exists; choose another name or pass --force to replace it. "
                            "Nothing was written.")
    model = resolve_model(args.model)
    converting = os.path.isfile(model) and model.endswith(".safetensors") and file_format(model) is not None
    if os.path.isfile(model) and not converting:
        raise NextStepError(f"{model} is a file; quantize reads the full-precision model folder (config.json, "
                            "model*.safetensors, tokenizer files), or a pre-quantized file to write again in the "
                            "current layout.")
    if converting and args.fmt not in (None, file_format(model)):
        raise NextStepError(f"{model} holds {file_format(model)} weights: it can be written again only as "
                            f"{file_format(model)} (--format {file_format(model)}); to make {args.fmt}, quantize the "
                            "full-precision model folder.")
    if not converting and args.fmt is None:
        raise NextStepError("--format is required: int8, fp8 or int4.")
    t0 = time.perf_counter()
    # Matrices are quantized from their stored precision; the rest is copied from the files, so
    # the compute dtype only decides what the embeddings occupy meanwhile.
    fmt = file_format(model) if converting else args.fmt
    earlier = converting and is_earlier_layout(model)
    backbone, _ = load_backbone(model, resolve_device(args.device), torch.bfloat16, quant=None if converting else fmt)
    save_quantized(backbone, model, out, lm_head=not args.no_lm_head, force=args.force)
    what = f"{fmt}, rewritten from {os.path.basename(model)}" if converting else fmt
    if earlier and fmt == "fp8":
        what += "; its per-row fp8 scales became one scale per matrix (requantized), as ComfyUI stores fp8"
    print(f"wrote {out} ({os.path.getsize(out) / 1e9:.2f} GB, {what}) in {time.perf_counter() - t0:.0f}s; keep it "
          "next to the model's tokenizer files (and vae/), or pass the VAE with --vae", file=sys.stderr)
    return 0


def weights_note(backbone, model: str, quant) -> str:
    """What the backbone's weights are and where they came from, for the output line."""
    from .weights.quant import format_of
    fmt = format_of(backbone)
    if fmt is None:
        return "full-precision weights"
    source = getattr(backbone, "source", model)
    if not os.path.isfile(source):
        return f"{fmt} weights quantized while loading"
    if quant is not None and os.path.isdir(model):
        return f"{fmt} weights from {os.path.basename(source)} in the model folder (not quantized at load)"
    return f"{fmt} weights from {os.path.basename(source)}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tiny":
            from .tiny import write_tiny
            write_tiny(args.out, edit=args.edit, v11=args.v11, shards=args.shards, seed=args.seed, force=args.force)
            print(f"wrote a tiny NextStep checkpoint to {args.out}")
            return 0
        if args.command == "quantize":
            return run_quantize(args)
        return run_generation(args)
    except NextStepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
