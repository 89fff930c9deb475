"""ComfyUI's ModelPatcher, with the loading and unloading of our parts done by the parts' own placers.

ComfyUI's memory manager decides when a model loads, how much of it may (its lowvram figure) and
when it must give memory back (another model needs the room, --disable-smart-memory after each
prompt). Its default way of loading part of a model casts `comfy.ops` layers one call at a time,
which our modules are not; so the patcher keeps ComfyUI's decisions and bookkeeping and hands the
moves to a placer: the flow head and the VAE go whole (they are small and run every token), the
backbone whole or as resident layers plus layers streamed from RAM (placement.BackbonePlacer).
Because the placed state is ComfyUI's to release, it stays between runs: a second run, or the
next storyboard panel, starts without moving anything.
"""
from __future__ import annotations

import torch

from . import bridge


def part_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def on(module: torch.nn.Module, device: torch.device) -> bool:
    p = next(module.parameters(), None)
    return p is not None and bridge.same_device(p.device, torch.device(device))


class WholePlacer:
    """A part that is either all on its device or all parked."""

    def __init__(self, part: torch.nn.Module, load_device: torch.device, offload_device: torch.device):
        self.part, self.load_device, self.offload_device = part, torch.device(load_device), torch.device(offload_device)

    def size(self) -> int:
        return part_bytes(self.part)

    def bytes_on_device(self) -> int:
        return part_bytes(self.part) if on(self.part, self.load_device) else 0

    def load(self, device: torch.device, budget: float) -> int:
        """Whole whatever the budget (under --novram too): the engine computes every token on these."""
        before = self.bytes_on_device()
        self.part.to(device)
        return self.bytes_on_device() - before

    def unload(self) -> int:
        freed = self.bytes_on_device()
        self.part.to(self.offload_device)
        return freed


def patcher_class():
    """-> the ModelPatcher subclass (built once, on first use under ComfyUI), or None outside it."""
    global _CLASS
    if _CLASS is None:
        base = bridge.model_patcher_base()
        if base is None:
            return None
        _CLASS = _subclass(base)
    return _CLASS


_CLASS = None


def _subclass(base):
    class NextStepPatcher(base):
        """Holds a PartHolder whose `placer` does the moves."""

        def model_size(self) -> int:
            """What loading it asks ComfyUI to free: the whole part while nothing is placed, then what
            is on the device (streamed layers live in RAM, which is not ComfyUI's to make room in)."""
            placed = self.model.placer.bytes_on_device()
            return placed if placed else self.model.placer.size()

        def loaded_size(self) -> int:
            return self.model.placer.bytes_on_device()

        def current_loaded_device(self):
            return self.load_device if self.model.placer.bytes_on_device() else self.offload_device

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False) -> int:
            """ComfyUI lets the part take `extra_memory` more bytes (1e32: no limit; 0.1: --novram)."""
            added = self.model.placer.load(torch.device(device_to), extra_memory)
            self._note_device()
            return max(0, added)

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False) -> int:
            """Everything goes: a backbone with fewer resident layers would need a new host buffer,
            which costs as much as placing it again on the next run."""
            freed = self.model.placer.unload()
            self._note_device()
            return freed

        def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
            """Older ComfyUI loads through here (0: the whole part)."""
            if load_weights and device_to is not None:
                self.partially_load(device_to, lowvram_model_memory or 1e32)
            return self.model

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                self.model.placer.unload()
                self._note_device()

        def detach(self, unpatch_all=True):
            """unpatch_all=False is ComfyUI forgetting its record of a model it is about to load again
            (every load request does this to an already loaded model): the weights stay where they are."""
            if unpatch_all:
                self.model.placer.unload()
                self._note_device()
            return self.model

        def _note_device(self) -> None:
            """The bookkeeping ComfyUI reads off the held module."""
            loaded = self.model.placer.bytes_on_device()
            self.model.device = self.load_device if loaded else self.offload_device
            self.model.model_loaded_weight_memory = loaded

    return NextStepPatcher
