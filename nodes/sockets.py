"""The pack's socket types and the objects that travel through them.

Each part gets its own type so the editor refuses to plug a VAE into a backbone input; the
object keeps what later nodes need to know (where it came from, which model variant, which
device it runs on) next to the engine module and its ComfyUI memory-manager handle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

BACKBONE = "NEXTSTEP_BACKBONE"
FLOW_HEAD = "NEXTSTEP_FLOW_HEAD"
VAE = "NEXTSTEP_VAE"


def label(kind: str) -> str:
    """NEXTSTEP_FLOW_HEAD -> "flow head", for messages."""
    return kind.split("_", 1)[1].lower().replace("_", " ")


@dataclass(eq=False)
class LoadedPart:
    kind: str                  # BACKBONE, FLOW_HEAD or VAE
    module: torch.nn.Module    # the engine's Backbone / FlowHead / NextStepVAE
    name: str                  # the dropdown entry it was loaded from
    path: str
    load_device: torch.device
    patcher: Optional[Any] = None    # comfy ModelPatcher under ComfyUI
    tokenizer: Optional[Any] = None  # backbone only
    variant: Optional[str] = None    # backbone: which released model (presets.PRESETS key)

    def __repr__(self) -> str:  # what ComfyUI prints when a value shows up in an error
        return f"<NextStep {label(self.kind)} {self.name!r} on {self.load_device}>"
