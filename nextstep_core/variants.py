"""The released NextStep models, once: loading names the variant from this table, presets read
its model-card settings, and the model folders' download hints its repo.

A new release is one row here (and, if its card samples differently, a sampler's `default_for`).
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Variant:
    name: str           # the engine's name for it (recorded in pre-quantized files)
    repo: str           # Hugging Face repo id
    card: dict          # the settings its model card (or example script) samples with
    release: str = "1"  # "1" (NextStep-1-Large) or "1.1"
    pretrain: bool = False
    edit: bool = False  # takes an input image

    @property
    def folder(self) -> str:
        """The folder name the repo downloads to (models/nextstep/<folder>)."""
        return self.repo.rpartition("/")[2]


TABLE = (
    Variant("nextstep1-large", "stepfun-ai/NextStep-1-Large", _T2I_V1),                  # its model card
    Variant("nextstep1-large-pretrain", "stepfun-ai/NextStep-1-Large-Pretrain", _T2I_V1, pretrain=True),
    Variant("nextstep1-large-edit", "stepfun-ai/NextStep-1-Large-Edit", _EDIT, edit=True),  # its example
    Variant("nextstep1.1", "stepfun-ai/NextStep-1.1", _T2I_V11, release="1.1"),          # its inference script
    Variant("nextstep1.1-pretrain", "stepfun-ai/NextStep-1.1-Pretrain", _T2I_V11, release="1.1", pretrain=True),
)
BY_NAME = {v.name: v for v in TABLE}
NAMES = tuple(BY_NAME)
FALLBACK = "nextstep1-large"  # a folder whose variant is not known is taken for NextStep-1-Large
EDIT_VARIANT = next(v.name for v in TABLE if v.edit)  # the edit model: its card's settings are the edit defaults


def named_by(folder_name: str) -> str | None:
    """The variant a folder's name says, or None where it says no more than NextStep-1-Large (the
    repos share one config class, so the name is the first clue). 1.1 outranks edit, edit pretrain."""
    name = folder_name.lower().replace("_", "-")
    release = "1.1" if "1.1" in name or "1-1" in name else "1"
    edit = "edit" in name and release == "1"
    pretrain = "pretrain" in name and not edit
    if release == "1" and not (edit or pretrain):
        return None
    return next((v.name for v in TABLE if (v.release, v.edit, v.pretrain) == (release, edit, pretrain)), None)


def by_folder(folder_name: str) -> Variant | None:
    """The variant whose repo downloads to a folder of this name (any case), if any."""
    return next((v for v in TABLE if v.folder.lower() == folder_name.lower()), None)
