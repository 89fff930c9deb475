"""The settings each official model card recommends, so picking a model picks its settings.
The sampler is the one whose `default_for` lists the variant (samplers/)."""
from __future__ import annotations

from .samplers import default_sampler

CARD_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
                 "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")
V11_NEGATIVE = ("lowres, bad anatomy, bad hands, bad texts, bad layout, error, missing fingers, extra digit, fewer "
                "digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                "username, blurry.")
CARD_POSITIVE = "masterpiece, film grained, best quality."

_T2I_V1 = dict(width=512, height=512, cfg=7.5, cfg_img=1.0, cfg_schedule="constant", steps=28, shift=1.0,
               use_norm=False, positive=CARD_POSITIVE, negative=CARD_NEGATIVE, seed=3407)
_T2I_V11 = dict(width=512, height=512, cfg=7.5, cfg_img=1.0, cfg_schedule="constant", steps=30, shift=1.0,
                use_norm=False, positive="", negative=V11_NEGATIVE, seed=42)
_EDIT = dict(width=512, height=512, cfg=7.5, cfg_img=2.0, cfg_schedule="constant", steps=50, shift=3.2,
             use_norm=True, positive="", negative="Copy original image.", seed=42)

PRESETS = {
    "nextstep1-large": _T2I_V1,                # stepfun-ai/NextStep-1-Large model card
    "nextstep1-large-pretrain": _T2I_V1,       # same card settings
    "nextstep1-large-edit": _EDIT,             # NextStep-1-Large-Edit example
    "nextstep1.1": _T2I_V11,                   # NextStep-1.1 inference script
    "nextstep1.1-pretrain": _T2I_V11,
}


FALLBACK = "nextstep1-large"  # a folder whose variant is not known gets the NextStep-1-Large card


def preset(variant: str) -> dict:
    known = variant if variant in PRESETS else FALLBACK
    return {**PRESETS[known], "sampler": default_sampler(known)}
