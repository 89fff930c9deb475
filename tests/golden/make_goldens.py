"""Remake the golden files by running StepFun's own pipeline on the pack's tiny checkpoints.

Run with a Python that has the official code's dependencies (see README.md beside this file):

    python tests/golden/make_goldens.py --official PATH/TO/NextStep-1 [--out tests/golden]

It writes every tiny checkpoint of MODELS with `nextstep_core.tiny.write_tiny` (fixed seeds, the same
numbers on every machine), records their digests, runs `NextStepPipeline.generate_image` of the
official code unmodified for every case of CASES on CPU float32 with one thread, and saves what
it produced. Nothing of our engine takes part in making a golden except the checkpoint writer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# name -> write_tiny arguments. Each is written fresh by the tests and must match its digest.
MODELS = {
    "t2i": {"seed": 0},
    "t2i-sharded": {"seed": 2, "shards": 3},
    "edit": {"seed": 1, "edit": True},  # the Edit repo's VAE config dialect (norm_fn / norm_level)
}

CARD_POSITIVE = "masterpiece, film grained, best quality."
CARD_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
                 "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")


def case(model, captions, hw, seed, steps, cfg=7.5, cfg_img=1.0, n=1, positive=None, negative=None,
         use_norm=False, schedule="constant", shift=1.0, image=None, note=""):
    return {"model": model, "captions": captions, "hw": list(hw), "seed": seed, "num_sampling_steps": steps,
            "cfg": cfg, "cfg_img": cfg_img, "num_images_per_caption": n, "positive_prompt": positive,
            "negative_prompt": negative, "use_norm": use_norm, "cfg_schedule": schedule, "timesteps_shift": shift,
            "image": image, "note": note}


CASES = {
    "t2i_64": case("t2i", "a red cube on a table", (64, 64), 42, 5, negative="blurry"),
    "t2i_128": case("t2i", "a lighthouse at dusk", (128, 128), 1, 4, negative="blurry",
                    note="a second size: 64 image tokens"),
    "t2i_use_norm_shift": case("t2i", "a blue bird", (64, 64), 9, 5, use_norm=True, shift=3.2, negative="gray"),
    "t2i_nocfg": case("t2i", "a dog", (64, 64), 3, 6, cfg=1.0, note="cfg 1: one row, no guidance"),
    "t2i_batch_linear": case("t2i", ["a red cube", "two cats"], (64, 64), 7, 4, cfg=4.0, n=2,
                             positive="best quality.", negative="lowres", use_norm=True, schedule="linear", shift=3.2,
                             note="2 captions x 2 images per caption, positive prompt, linear cfg schedule"),
    "t2i_28steps_card": case("t2i", "a lighthouse at dusk", (32, 32), 3407, 28, positive=CARD_POSITIVE,
                             negative=CARD_NEGATIVE, note="the model card's steps and prompts"),
    "t2i_nonsquare_raises": case("t2i", "a tall tower", (96, 32), 11, 3,
                                 note="6x2 tokens: the release's unpatchify raises; images decoded with the grid"),
    "t2i_nonsquare_square_count": case("t2i", "a wide street", (32, 128), 13, 3,
                                       note="2x8 tokens: the release's unpatchify silently makes a wrong 4x4 "
                                            "image; tokens and prompt rows only"),
    "t2i_sharded": case("t2i-sharded", "a green apple", (64, 64), 5, 4, negative="blurry",
                        note="three shards with model.safetensors.index.json"),
    "edit": case("edit", "<image>make it blue", (64, 64), 42, 5, cfg_img=2.0, negative="Copy original image.",
                 use_norm=True, shift=3.2, image="edit_input.png", note="3-way CFG"),
    "edit_2x": case("edit", "<image>make it blue", (64, 64), 5, 5, cfg_img=2.0, n=2, negative="Copy original image.",
                    use_norm=True, shift=3.2, image="edit_input.png", note="3-way CFG, 2 images per caption"),
}


def install_torchvision_stand_in() -> None:
    """The official pipeline only uses ToTensor and Normalize from torchvision, and no torchvision
    build exists for every CPU torch; this serves exactly those two, with torchvision's arithmetic."""
    import numpy as np

    class Compose:
        def __init__(self, fns):
            self.fns = fns

        def __call__(self, x):
            for f in self.fns:
                x = f(x)
            return x

    class ToTensor:
        def __call__(self, pic):
            arr = torch.from_numpy(np.array(pic, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
            return arr.to(torch.float32).div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, t):
            mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
            return t.sub(mean).div(std)

    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    tr.Compose, tr.ToTensor, tr.Normalize = Compose, ToTensor, Normalize
    tv.transforms = tr
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr})


def import_release_utils() -> None:
    """The release's import_utils formats `torch.version.cuda` into a log line at import time, which
    fails on a CPU-only torch (it is None there). A placeholder is shown to it for that import only;
    nothing it sets depends on the value."""
    import torch.version
    saved = torch.version.cuda
    torch.version.cuda = saved or "0.0"
    try:
        import nextstep.utils.import_utils  # noqa: F401
    finally:
        torch.version.cuda = saved


def vae_kwargs(model_dir: str) -> dict:
    """The Edit repo's VAE config says `norm_fn: layer_norm, norm_level: channel` where the others say
    `encoder_norm: true`; the Hub repo's own VAE code reads it as the same channel LayerNorm, but the
    GitHub class this script runs does not know these keys and would drop the normalisation. So it
    is handed over as the `encoder_norm` the class understands."""
    with open(os.path.join(model_dir, "vae", "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    if cfg.get("norm_fn") == "layer_norm" and cfg.get("norm_level") == "channel":
        return {"encoder_norm": True}
    return {}


def run_case(pipe_cls, vae_cls, model_dir: str, args: dict, golden_dir: Path) -> dict:
    from PIL import Image
    vae = vae_cls.from_pretrained(os.path.join(model_dir, "vae"), **vae_kwargs(model_dir))
    pipe = pipe_cls(model_name_or_path=model_dir, vae=vae).to("cpu", torch.float32)
    seen = {}
    add_prefix, decoding, vae_decode = pipe._add_prefix_ids, pipe.decoding, pipe.vae.decode

    def record_prefix(*a, **k):
        seen["input_ids"], seen["attention_mask"] = out = add_prefix(*a, **k)
        return out

    def record_tokens(*a, **k):
        seen["tokens"] = decoding(*a, **k)
        return seen["tokens"]

    def record_decode(*a, **k):
        out = vae_decode(*a, **k)
        seen["pixels"] = out.sample
        return out

    pipe._add_prefix_ids, pipe.decoding, pipe.vae.decode = record_prefix, record_tokens, record_decode
    h, w = args["hw"]
    images = [Image.open(golden_dir / args["image"]).convert("RGB")] if args["image"] else None
    call = dict(captions=args["captions"], images=images, num_images_per_caption=args["num_images_per_caption"],
                positive_prompt=args["positive_prompt"], negative_prompt=args["negative_prompt"], hw=(h, w),
                use_norm=args["use_norm"], cfg=args["cfg"], cfg_img=args["cfg_img"], cfg_schedule=args["cfg_schedule"],
                timesteps_shift=args["timesteps_shift"], num_sampling_steps=args["num_sampling_steps"],
                seed=args["seed"], progress=False)
    with torch.no_grad():
        try:
            pipe.generate_image(**call)
            raised = None
        except AssertionError as exc:  # the release's unpatchify without a grid on a non-square count
            raised = str(exc)
            lat = pipe.model.unpatchify(seen["tokens"], h // 16, w // 16)
            lat = lat / pipe.scaling_factor + pipe.shift_factor
            seen["pixels"] = pipe.vae.decode(lat).sample
    square_count = (h // 16) * (w // 16) == int(((h // 16) * (w // 16)) ** 0.5) ** 2
    out = {"tokens": seen["tokens"].float().contiguous(), "input_ids": seen["input_ids"].contiguous(),
           "attention_mask": seen["attention_mask"].contiguous()}
    if h == w or not square_count:  # a square count off the diagonal decodes to a wrong square image
        out["images"] = (seen["pixels"].float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()
    return out, raised


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="checkout of github.com/stepfun-ai/NextStep-1 at 6e49bae")
    ap.add_argument("--out", default=str(ROOT / "tests" / "golden"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # the release's own switch: run its functions eagerly (torch.compile of the head is a speed
    # option; on CPU it recompiles per shape until it hits the limit)
    os.environ["ENABLE_TORCH_COMPILE"] = "false"
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, os.path.abspath(args.official))
    import diffusers  # noqa: F401  (imported first: it must see that no torchvision is installed)
    import transformers  # noqa: F401
    install_torchvision_stand_in()
    import_release_utils()
    from nextstep.models.modeling_flux_vae import AutoencoderKL
    from nextstep.models.pipeline_nextstep import NextStepPipeline
    from safetensors.torch import save_file

    from nextstep_core.tiny import digest, write_tiny
    out = Path(args.out)
    import importlib.metadata as md
    versions = {p: md.version(p) for p in ("torch", "transformers", "diffusers", "tokenizers", "numpy", "Pillow")}
    models, cases = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in MODELS.items():
            folder = write_tiny(os.path.join(tmp, name), **kwargs)
            models[name] = {"write_tiny": kwargs, "digest": digest(folder)}
        for name, spec in CASES.items():
            tensors, raised = run_case(NextStepPipeline, AutoencoderKL, os.path.join(tmp, spec["model"]), spec, out)
            save_file(tensors, str(out / f"{name}.safetensors"))
            cases[name] = dict(spec, official_raised=raised, has_images="images" in tensors)
            print(f"{name}: tokens {tuple(tensors['tokens'].shape)}" + (f" (official raised: {raised})" if raised else ""))
    meta = {"official_commit": "6e49bae", "threads": 1, "dtype": "float32", "device": "cpu", "versions": versions,
            "models": models, "cases": cases}
    tmp_json = out / "cases.json.tmp"
    tmp_json.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_json, out / "cases.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
