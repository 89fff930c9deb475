"""The three loader nodes: backbone (+ tokenizer), flow head, VAE, each from a dropdown.

Three loaders rather than one: the parts have very different sizes (14B / 157M / 84M), so a
user can keep a different dtype per part, and one VAE serves every NextStep model.
Each part is built from ComfyUI's own layer classes and held by its own patcher (core_memory.py),
its weights read onto the device ComfyUI parks models on; the generate nodes ask ComfyUI to load
them when they run, and ComfyUI pages, offloads and keeps them as it does its own models.
"""
from __future__ import annotations

from . import bridge, core_memory, model_folders
from .sockets import BACKBONE, FLOW_HEAD, VAE, LoadedPart
from ..nextstep_core.api import load_backbone, load_flow_head, load_vae, model_variant, resolve_dtype

CATEGORY = "NextStep/loaders"
DTYPES = ["auto", "bf16", "fp16", "fp32"]
DEVICES = ["auto", "cpu"]
WEIGHTS = ["full", "int8", "fp8", "int4"]


def _common_inputs(what: str, auto_note: str) -> dict:
    return {
        "dtype": (DTYPES, {"default": "auto", "tooltip": (
            f"Precision the {what} weights are kept in. auto: bf16 on GPUs that support it, fp16 on older GPUs, "
            f"fp32 on CPU. {auto_note}")}),
        "device": (DEVICES, {"default": "auto", "tooltip": (
            "Where it runs. auto: ComfyUI's GPU, moved back to RAM when other models need the room. cpu: always "
            "on the CPU (very slow for the backbone). All three NextStep loaders must use the same device.")}),
    }


def _target(dtype: str, device: str):
    """-> (device it runs on, device it waits on, weight dtype)."""
    load_dev, park_dev = bridge.devices(device)
    return load_dev, park_dev, resolve_dtype(dtype, load_dev)


def _part(kind: str, name: str, path: str, module, load_dev, park_dev, **extra) -> LoadedPart:
    return LoadedPart(kind=kind, module=module, name=name, path=path, load_device=load_dev,
                      patcher=core_memory.manage(module, load_dev, park_dev), **extra)


class NextStepBackboneLoader:
    DESCRIPTION = ("Loads the NextStep transformer backbone and its tokenizer from a Hugging Face model folder in "
                   "models/nextstep (e.g. NextStep-1-Large). Set weights for your GPU: at 14B the decoder weights are "
                   "about 7 GB in int4, 14 GB in int8/fp8 and 28 GB in full bf16. 8 GB cards: int4 (part of it comes "
                   "from RAM); 12 GB: int4 fits whole; 16-24 GB: int8 (fp8 on Ada/Hopper); 48 GB: full. What does not "
                   "fit in free VRAM is read from RAM each token: it runs, only slower.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (BACKBONE,)
    RETURN_NAMES = ("backbone",)
    OUTPUT_TOOLTIPS = ("The backbone and tokenizer; connect it to a NextStep Text to Image or Edit node.",)
    SEARCH_ALIASES = ["nextstep model", "nextstep checkpoint"]

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (list(model_folders.model_folders()), {"tooltip": (
                "A NextStep model folder from models/nextstep: the folder a Hugging Face repo downloads to "
                "(config.json, model*.safetensors, tokenizer files). NextStep-1-Large* and NextStep-1.1* for "
                "text to image, NextStep-1-Large-Edit for editing.")}),
            **_common_inputs("backbone", "With weights full, the 14B decoder weights are about 28 GB in bf16/fp16 "
                                         "and 56 GB in fp32; int8/fp8 and int4 (weights) hold its matrices in "
                                         "14 GB or 7 GB."),
            "weights": (WEIGHTS, {"default": "full", "tooltip": (
                "full: the weights as downloaded (in dtype), about 28 GB of decoder weights at 14B in bf16. "
                "int8 / fp8: the decoder's matrices in 8 bits, about 14 GB, quantized while loading (or read from a "
                "pre-quantized file of that format in the folder, made with `python -m nextstep_core quantize`). "
                "int8 works on every GPU and is the closer to full; fp8 uses fp8 matmuls on Ada/Hopper GPUs. int4: "
                "group-wise 4-bit, about 7 GB, with torch's int4 kernels on Ampere and newer. By card: 8 GB int4; "
                "12 GB int4 (fits whole); 16-24 GB int8 or fp8; 48 GB full. Whatever does not fit in free VRAM is "
                "read from RAM each token (slower, but it runs).")}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return model_folders.check(model_name, "model")

    def load(self, model_name, dtype, device, weights="full"):
        # an unknown format is refused by the engine's loader (check_format), before any file is read
        path = model_folders.resolve_model(model_name)
        load_dev, park_dev, dt = _target(dtype, device)
        quant = None if weights == "full" else weights
        backbone, tokenizer = load_backbone(path, device=park_dev, dtype=dt, quant=quant,
                                            ops=core_memory.operations(dt, load_dev),
                                            quant_linear=quant and core_memory.quantized_linear(dt, load_dev, quant))
        return (_part(BACKBONE, model_name, path, backbone, load_dev, park_dev, tokenizer=tokenizer,
                      variant=model_variant(path)),)


class NextStepFlowHeadLoader:
    DESCRIPTION = ("Loads the flow-matching head (about 157M parameters) that turns each backbone state into an "
                   "image token. It lives in the same model folder as the backbone: pick the same folder.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (FLOW_HEAD,)
    RETURN_NAMES = ("flow_head",)
    OUTPUT_TOOLTIPS = ("The flow head; connect it to a NextStep Text to Image or Edit node.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (list(model_folders.model_folders()), {"tooltip": (
                "The NextStep model folder to read the flow head (image_head.* weights) from; the same folder as "
                "the backbone.")}),
            **_common_inputs("flow head", "The head is small (about 0.3 GB in bf16)."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return model_folders.check(model_name, "model")

    def load(self, model_name, dtype, device):
        path = model_folders.resolve_model(model_name)
        load_dev, park_dev, dt = _target(dtype, device)
        head = load_flow_head(path, device=park_dev, dtype=dt, ops=core_memory.operations(dt, load_dev))
        return (_part(FLOW_HEAD, model_name, path, head, load_dev, park_dev),)


class NextStepVAELoader:
    DESCRIPTION = ("Loads NextStep's image tokenizer (a 16-channel f8 VAE, about 84M parameters): the vae/ folder "
                   "of a NextStep model folder, a standalone VAE folder in models/nextstep, or a file in "
                   "ComfyUI's vae folder.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The VAE; connect it to a NextStep Text to Image or Edit node.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (list(model_folders.vae_choices()), {"tooltip": (
                "<model>/vae is the VAE shipped inside a NextStep model folder (all NextStep models share it); "
                "vae/<file> is a file from ComfyUI's models/vae folder.")}),
            **_common_inputs("VAE", "The VAE is small (about 0.2 GB in bf16)."),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name):
        return model_folders.check(vae_name, "vae")

    def load(self, vae_name, dtype, device):
        path = model_folders.resolve_vae(vae_name)
        load_dev, park_dev, dt = _target(dtype, device)
        vae = load_vae(path, device=park_dev, dtype=dt, ops=core_memory.operations(dt, load_dev))
        return (_part(VAE, vae_name, path, vae, load_dev, park_dev),)
