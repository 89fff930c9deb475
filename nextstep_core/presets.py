"""The settings each official model card recommends, so picking a model picks its settings.
The sampler is the one whose `default_for` lists the variant (samplers/)."""
from __future__ import annotations

from .samplers import default_sampler
from .variants import CARD_NEGATIVE, CARD_POSITIVE, FALLBACK, TABLE, V11_NEGATIVE  # noqa: F401 (names kept)

# the model-card settings of each released variant, by name (variants.TABLE holds them)
PRESETS = {v.name: v.card for v in TABLE}


def preset(variant: str) -> dict:
    known = variant if variant in PRESETS else FALLBACK
    return {**PRESETS[known], "sampler": default_sampler(known)}
