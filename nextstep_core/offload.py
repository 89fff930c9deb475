"""Low-VRAM mode: keep only some decoder layers on the GPU and stream the rest in per token.

Every image token runs every layer once, so an offloaded layer crosses PCIe once per token:
at ~25 GB/s, each GB kept in CPU RAM adds ~40 ms per token (~40 s for a 512x512 image). That is
the honest price of running the 14B backbone on a 12-16 GB card; `estimate()` reports it before
a run. The next offloaded layer is copied on a side stream while the current one computes, so
copies overlap compute; on CPU-only machines the same code runs with plain copies (tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import Backbone


@dataclass
class StreamPlan:
    resident: int
    streamed: int
    streamed_bytes: int

    def seconds_per_token(self, pcie_gbps: float = 25.0) -> float:
        return self.streamed_bytes / (pcie_gbps * 1e9)

    def describe(self, tokens: int = 1024) -> str:
        per = self.seconds_per_token()
        return (f"{self.resident} decoder layers on the GPU, {self.streamed} streamed from CPU RAM "
                f"({self.streamed_bytes / 2**30:.1f} GiB per token over PCIe: about {per * 1000:.0f} ms per token, "
                f"{per * tokens:.0f} s more for a {tokens}-token image)")


def layer_bytes(layer: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


class LayerStreamer:
    """Installs hooks on the decoder layers after the first `resident` ones."""

    def __init__(self, backbone: Backbone, device, resident: int):
        self.device = torch.device(device)
        self.backbone = backbone
        self.layers = list(backbone.layers)
        self.streamed = self.layers[resident:]
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.host: dict[int, list[torch.Tensor]] = {}
        self.ready: dict[int, tuple] = {}
        self.handles = []
        for layer in self.streamed:
            params = list(layer.parameters())
            self.host[id(layer)] = [p.data.to("cpu").pin_memory() if cuda else p.data.to("cpu") for p in params]
            for p, h in zip(params, self.host[id(layer)]):
                p.data = h
            self.handles.append(layer.register_forward_pre_hook(self._before))
            self.handles.append(layer.register_forward_hook(self._after))
        self.plan = StreamPlan(resident, len(self.streamed), sum(layer_bytes(x) for x in self.streamed))

    def _fetch(self, layer) -> None:
        if id(layer) in self.ready:
            return
        host = self.host[id(layer)]
        if self.stream is None:
            self.ready[id(layer)] = ([h.to(self.device, copy=True) for h in host], None)
            return
        with torch.cuda.stream(self.stream):
            tensors = [h.to(self.device, non_blocking=True) for h in host]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[id(layer)] = (tensors, event)

    def _before(self, layer, args):
        self._fetch(layer)
        tensors, event = self.ready.pop(id(layer))
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for t in tensors:  # the copies were made on the side stream: keep them alive for this one
                t.record_stream(torch.cuda.current_stream(self.device))
        for p, t in zip(layer.parameters(), tensors):
            p.data = t
        i = self.streamed.index(layer)
        self._fetch(self.streamed[(i + 1) % len(self.streamed)])  # overlap the next copy with this layer

    def _after(self, layer, args, output):
        for p, h in zip(layer.parameters(), self.host[id(layer)]):
            p.data = h  # drop the GPU copy; the caching allocator reuses it for the next layer
        return output

    def remove(self) -> None:
        """Put every layer back on the compute device and remove the hooks."""
        for h in self.handles:
            h.remove()
        for layer in self.streamed:
            for p, h in zip(layer.parameters(), self.host[id(layer)]):
                p.data = h.to(self.device)
        self.ready.clear()
        self.backbone.streamer = None


def stream_layers(backbone: Backbone, gpu_layers: int) -> LayerStreamer | None:
    """Keep `gpu_layers` decoder layers resident (all of them: no streaming)."""
    n = len(backbone.layers)
    if gpu_layers >= n:
        return None
    if gpu_layers < 0:
        from .errors import SettingsError
        raise SettingsError(f"gpu_layers={gpu_layers}: use 0..{n} ({n} keeps the whole backbone on the GPU).")
    streamer = LayerStreamer(backbone, backbone.device, gpu_layers)
    backbone.streamer = streamer
    return streamer
