"""NextStep Edit: one edited image per input image, following a written instruction."""
from __future__ import annotations

from . import runner, settings
from ..nextstep_core.api import CFG_IMG, EDIT_VARIANT, FIT_MODES, InputImageError, Request, from_hwc_float, preset

CARD = preset(EDIT_VARIANT)  # the NextStep-1-Large-Edit example's settings


def input_images(image) -> list:
    """IMAGE batch [B, H, W, C] -> RGB PIL images; the request fits them to a size the model takes."""
    if not hasattr(image, "shape") or image.ndim != 4 or image.shape[0] == 0:
        raise InputImageError(f"The image input must be an IMAGE batch [B, H, W, C]; got "
                              f"{tuple(getattr(image, 'shape', ()))}. Connect a Load Image node.")
    return [from_hwc_float(image[i]) for i in range(image.shape[0])]


class NextStepEdit:
    DESCRIPTION = ("Edits images by instruction with NextStep-1-Large-Edit: every image of the input batch is "
                   "resized to a size the model accepts (see fit) and edited once, with the same instruction. "
                   "Defaults are the official edit example's settings.")
    CATEGORY = settings.CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The edited images, one per input image, at the fitted size.",)
    SEARCH_ALIASES = ["nextstep edit", "image edit", "instruct edit"]

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **settings.model_inputs(),
                "image": ("IMAGE", {"tooltip": "The image(s) to edit. A batch gives one edit per image."}),
                "instruction": settings.prompt_input("What to change, e.g. 'Add a red hat to the cat.'"),
                "positive_prompt": settings.prompt_input(
                    "Added after the instruction on the guided row. Empty in the official example.",
                    CARD["positive"], multiline=False),
                "negative_prompt": settings.prompt_input(
                    "What guidance steers away from. The official edit example uses 'Copy original image.' so the "
                    "model does change something.", CARD["negative"], multiline=False),
                "fit": (list(FIT_MODES), {"default": "bucket", "tooltip": (
                    "How the input becomes a valid size (sides multiples of 16). bucket: the nearest trained aspect "
                    "ratio at `size`, scaled to cover and centre-cropped (what the official edit demo does). "
                    "center-crop: a size x size square. resize: keep the aspect, about size x size pixels, no crop. "
                    "none: use the image as it is (its sides must already be multiples of 16).")}),
                "size": settings.size_input(512, (
                    "Base size for fit: the output has about size x size pixels (512 matches training). Ignored "
                    "when fit is none.")),
                "cfg": settings.cfg_input(CARD["cfg"], (
                    "Text guidance: how strongly the edit follows the instruction. 1 turns guidance off.")),
                "cfg_img": settings.cfg_input(CARD["cfg_img"], (
                    "Image guidance: how closely the result keeps the input image. 1 turns it off; the example "
                    "uses 2.0."), CFG_IMG),
                **settings.sampling_inputs(CARD["steps"], CARD["shift"], CARD["use_norm"]),
                "seed": settings.seed_input(CARD["seed"]),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    # No VALIDATE_INPUTS (see the text-to-image node): ComfyUI checks the declared range, and the
    # request refuses a size off the 16-px grid as it is made, before any work.

    def edit(self, backbone, flow_head, vae, image, instruction, positive_prompt, negative_prompt, fit, size, cfg,
             cfg_img, steps, timesteps_shift, use_norm, sampler, cfg_schedule, seed, unique_id=None):
        images = input_images(image)
        request = Request(  # checks itself and fits the inputs as it is made: their size is the output's
            prompts=[instruction], width=None, height=None, positive=positive_prompt, negative=negative_prompt,
            seed=int(seed), edit_images=images, fit=fit, fit_base=size,
            sampling=settings.sampling(backbone, cfg=cfg, cfg_img=cfg_img, cfg_schedule=cfg_schedule, steps=steps,
                                       timesteps_shift=timesteps_shift, use_norm=use_norm, sampler=sampler))
        result = runner.run(backbone, flow_head, vae, request, node_id=unique_id)
        width, height = request.size
        # the editor's cost line shows what was drawn: the size the input was fitted to
        return {"ui": {"fitted": [width, height, len(images)]}, "result": (result.images,)}
