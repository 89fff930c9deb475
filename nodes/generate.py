"""NextStep Text to Image."""
from __future__ import annotations

from . import remote, runner, settings
from ..nextstep_core.api import FALLBACK, ReasoningSettings, Request, preset

CARD = preset(FALLBACK)  # the NextStep-1-Large model card's recommended settings


def reasoning_settings(self_cot: bool, reasoning) -> ReasoningSettings:
    """A connected reasoning text is used as it is (reproducible, no text generation);
    otherwise self_cot lets the model write its own."""
    if isinstance(reasoning, str) and reasoning.strip():
        return ReasoningSettings(mode="think", text=reasoning)
    return ReasoningSettings(mode="think" if self_cot else "off")


def reasoning_text(texts: list) -> str:
    """One text per image of the batch; identical ones (greedy decoding) are shown once."""
    unique = [t for i, t in enumerate(texts) if t and t not in texts[:i]]
    return "\n\n".join(unique)


class NextStepTextToImage:
    DESCRIPTION = ("Draws images from a text prompt with a NextStep model, one 16x16 patch at a time, showing the "
                   "picture as it fills in. Defaults are the NextStep-1-Large model card's settings. Outputs the "
                   "images and, with Self-CoT on, the model's reasoning text.")
    CATEGORY = settings.CATEGORY
    FUNCTION = "generate"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "reasoning")
    OUTPUT_TOOLTIPS = ("The generated images (batch_size of them).",
                       "What the model reasoned before drawing (Self-CoT); empty when self_cot is off.")
    SEARCH_ALIASES = ["nextstep", "text to image", "t2i", "autoregressive"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **settings.model_inputs(),
                "prompt": settings.prompt_input("What to draw. Descriptive English captions work best."),
                "positive_prompt": settings.prompt_input(
                    "Added after the prompt on the guided row (the model card's quality tags). Leave empty for "
                    "NextStep-1.1.", CARD["positive"], multiline=False),
                "negative_prompt": settings.prompt_input(
                    "What guidance steers away from (the unconditional row).", CARD["negative"], multiline=False),
                "width": settings.size_input(CARD["width"], (
                    "Image width in pixels, a multiple of 16. The models were trained on these sizes (width x "
                    f"height): {settings.bucket_list()}.")),
                "height": settings.size_input(CARD["height"], "Image height in pixels, a multiple of 16; see width "
                                              "for the trained sizes."),
                "cfg": settings.cfg_input(CARD["cfg"], (
                    "Classifier-free guidance scale: how strongly the image follows the prompt. 1 turns guidance "
                    "off (and halves the work); the model cards use 7.5.")),
                **settings.sampling_inputs(CARD["steps"], CARD["shift"], CARD["use_norm"]),
                "self_cot": ("BOOLEAN", {"default": False, "tooltip": (
                    "Self-CoT: the model first writes its reasoning about the prompt (up to 256 tokens, greedy), "
                    "then draws with it in context. The text comes out of the reasoning output. Needs the "
                    "backbone's LM head (about 1.5 GB more at 14B, read on first use).")}),
                "seed": settings.seed_input(CARD["seed"]),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 16, "tooltip": (
                    "Images made together from the prompt, each with its own noise. Memory grows with it.")}),
            },
            "optional": {
                "reasoning": ("STRING", {"forceInput": True, "tooltip": (
                    "Your own reasoning text: when connected and not empty it is used as the Self-CoT reasoning "
                    "(the model writes none), whatever self_cot says.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    # No VALIDATE_INPUTS: ComfyUI would attach its message to every input it takes (a bad width
    # reported against height too) and skip its own min/max checks for them. The declared ranges
    # are checked by ComfyUI on each input; what they cannot catch (a size off the 16-px grid,
    # NaN) the request refuses as it is made, before any work, naming the input and the value.

    def generate(self, backbone, flow_head, vae, prompt, positive_prompt, negative_prompt, width, height, cfg, steps,
                 timesteps_shift, use_norm, sampler, cfg_schedule, self_cot, seed, batch_size, reasoning=None,
                 unique_id=None):
        request = Request(  # checks itself as it is made: nothing is loaded before its settings are known good
            prompts=[prompt], width=width, height=height, positive=positive_prompt,
            negative=negative_prompt, images_per_prompt=int(batch_size), seed=int(seed),
            sampling=settings.sampling(backbone, cfg=cfg, cfg_img=1.0, cfg_schedule=cfg_schedule, steps=steps,
                                       timesteps_shift=timesteps_shift, use_norm=use_norm, sampler=sampler),
            reasoning=reasoning_settings(self_cot, reasoning))
        if remote.is_remote(backbone, flow_head, vae):  # a NextStep Server: vLLM-Omni draws it
            return {"ui": {"reasoning": [""]}, "result": (remote.text_to_image(backbone, flow_head, vae, request,
                                                                                 unique_id), "")}
        result = runner.run(backbone, flow_head, vae, request, node_id=unique_id)
        text = reasoning_text(result.reasoning)
        return {"ui": {"reasoning": [text]}, "result": (result.images, text)}
