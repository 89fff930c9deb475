"""Low-VRAM mode: keep only some decoder layers on the GPU and stream the rest in per token.

Every image token runs every layer once, so a streamed layer crosses PCIe once per token: at
~25 GB/s each GB kept in CPU RAM adds ~40 ms per token. memory.py decides how many layers stay;
this module moves them:

- Only the resident layers (and the small non-layer parts) are moved to the device; streamed
  layers go from wherever they were loaded (CPU RAM) into one host buffer each, so a card smaller
  than the model never holds it whole, not even while loading.
- A host buffer is ordinary memory registered with CUDA (`cudaHostRegister`, under the streaming
  device so that device's context sees it pinned), not taken from torch's pinned caching
  allocator, which rounds every block up to a power of two (a 550 MB layer would pin 1 GB).
- Placing the backbone again (another layer count, after `remove`) keeps the host buffer of every
  layer that streams in both placements, frees those of layers that become resident before any
  new buffer is made, and makes buffers only for layers newly streamed: RAM never holds two
  copies of the streamed layers.
- Copies land in two preallocated device buffers used in turn: the copy of the next layer waits
  (on the copy stream) for an event recorded after the layer that last used its buffer, and
  compute waits for the copy's event. Nothing is allocated per token and nothing syncs the host,
  so a CPU running a token ahead cannot make streaming take all free memory.

On CPU the same code runs with plain copies (tests).
"""
from __future__ import annotations

import torch

from ..backbone import Backbone
from ..memory import MemoryPlan

ALIGN = 256  # bytes: every tensor view starts aligned as the CUDA allocator would align it


def layer_bytes(layer: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def _layout(layer: torch.nn.Module) -> tuple[list, int]:
    """[(offset, nbytes)] of each parameter within one layer's span, and the span's size."""
    spans, off = [], 0
    for p in layer.parameters():
        n = p.numel() * p.element_size()
        spans.append((off, n))
        off += -(-n // ALIGN) * ALIGN
    return spans, off


def _view(flat: torch.Tensor, start: int, nbytes: int, like: torch.Tensor) -> torch.Tensor:
    return flat[start:start + nbytes].view(like.dtype).view(like.shape)


class _Registered:
    """Page-locks an ordinary host tensor in place, exactly its size, for `device`'s context, and
    unlocks it on release."""

    def __init__(self, flat: torch.Tensor, device):
        self.flat, self.device, self.done = flat, torch.device(device), False
        with torch.cuda.device(self.device):
            err = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed ({err})")

    def release(self) -> None:
        if not self.done:
            with torch.cuda.device(self.device):
                torch.cuda.cudart().cudaHostUnregister(self.flat.data_ptr())
            self.done = True


def _kept_host_copy(layer, spans, span: int, device: torch.device):
    """The layer's host buffer when an earlier placement for `device` left its parameters as views
    of one, laid out as `spans` (then nothing is copied or allocated); else None."""
    if getattr(layer, "_nextstep_host_for", None) != device:
        return None
    params = list(layer.parameters())
    if not params or len(params) != len(spans) or params[0].device.type != "cpu":
        return None
    storage = params[0].untyped_storage()
    if storage.nbytes() != span:
        return None
    base = storage.data_ptr()
    for p, (off, n) in zip(params, spans):
        if (p.device.type != "cpu" or p.untyped_storage().data_ptr() != base or p.data_ptr() != base + off
                or p.numel() * p.element_size() != n or not p.is_contiguous()):
            return None
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (span,))


class LayerStreamer:
    """Keeps the first `resident` decoder layers on `device` and streams the others."""

    def __init__(self, backbone: Backbone, device, resident: int, plan: MemoryPlan | None = None):
        self.device = torch.device(device)
        self.backbone = backbone
        layers = list(backbone.layers)
        self.streamed = layers[resident:]
        cuda = self.device.type == "cuda"
        for name, child in backbone.named_children():
            if name != "layers":
                child.to(self.device)
        for layer in layers[:resident]:
            layer.to(self.device)  # a host buffer it had from an earlier placement is freed here
            layer.__dict__.pop("_nextstep_host_for", None)
        # A layer is configured for the device (e.g. int4 repacked for its kernel) by moving it there
        # once, one layer at a time, and its bytes are then kept in its host buffer.
        spans, self.span = _layout(self.streamed[0]) if self.streamed else ([], 0)
        self.hosts: dict[int, torch.Tensor] = {}
        self.views: dict[int, list[torch.Tensor]] = {}
        for layer in self.streamed:
            host = _kept_host_copy(layer, spans, self.span, self.device)
            if host is not None:
                self.hosts[id(layer)] = host
                self.views[id(layer)] = [p.data for p in layer.parameters()]
                continue
            layer.to(self.device)
            for m in layer.modules():  # weights in the layout the device computes with (int4), before copying
                if hasattr(m, "prepare"):
                    m.prepare()
            host = self.hosts[id(layer)] = torch.empty(self.span, dtype=torch.uint8)
            views = []
            for p, (off, n) in zip(layer.parameters(), spans):
                v = _view(host, off, n, p.data)
                v.copy_(p.data)
                p.data = v
                views.append(v)
            self.views[id(layer)] = views
            layer._nextstep_host_for = self.device
        self.spans = spans
        self.pinned = []
        if cuda and self.streamed:
            try:
                for host in self.hosts.values():
                    self.pinned.append(_Registered(host, self.device))
            except (RuntimeError, AttributeError) as exc:  # e.g. a locked-memory limit in a container
                import warnings
                for r in self.pinned:
                    r.release()
                self.pinned = []
                warnings.warn(f"Could not page-lock {self.span * len(self.streamed) / 2**30:.1f} GiB for streaming "
                              f"({exc}); copies will not overlap compute, so streaming is slower.")
        self.slots = [torch.empty(self.span, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.slot_free = [None, None]   # event: the layer that last used slot k has run
        self.ready: dict[int, tuple] = {}  # layer id -> (slot, copy-done event)
        self.turn = 0
        self.handles = []
        for layer in self.streamed:
            self.handles.append(layer.register_forward_pre_hook(self._before))
            self.handles.append(layer.register_forward_hook(self._after))
        self.index = {id(layer): i for i, layer in enumerate(self.streamed)}
        if plan is None:  # a fixed layer count asked for directly: the model's figures for a 512x512 image
            from ..memory import plan as make_plan
            from .quant import format_of
            plan = make_plan(backbone.cfg, format_of(backbone), backbone.dtype.itemsize, width=512, height=512,
                             gpu_layers=resident)
        self.plan = plan

    def _fetch(self, layer) -> None:
        if id(layer) in self.ready:
            return
        k, self.turn = self.turn, 1 - self.turn
        src = self.hosts[id(layer)]
        if self.stream is None:
            self.slots[k].copy_(src)
            self.ready[id(layer)] = (k, None)
            return
        with torch.cuda.stream(self.stream):
            if self.slot_free[k] is not None:
                self.stream.wait_event(self.slot_free[k])
            self.slots[k].copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.ready[id(layer)] = (k, done)

    def _before(self, layer, args):
        self._fetch(layer)
        k, done = self.ready.pop(id(layer))
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        for p, (off, n), h in zip(layer.parameters(), self.spans, self.views[id(layer)]):
            p.data = _view(self.slots[k], off, n, h)
        layer._nextstep_slot = k
        i = self.index[id(layer)]
        self._fetch(self.streamed[(i + 1) % len(self.streamed)])  # overlap the next copy with this layer

    def _after(self, layer, args, output):
        if self.stream is not None:
            used = torch.cuda.Event()
            used.record(torch.cuda.current_stream(self.device))
            self.slot_free[layer._nextstep_slot] = used
        for p, h in zip(layer.parameters(), self.views[id(layer)]):
            p.data = h  # back to the host copy; the slot is overwritten by a later fetch
        return output

    def reset(self) -> None:
        """Back to the state between tokens, whatever the last forward did: a run stopped inside the
        layers leaves a prefetch whose buffer the next fetch may reuse, and the layer it stopped in
        still pointing at a buffer. A placement kept for the next run starts from here."""
        if self.stream is not None:
            self.stream.synchronize()
        self.ready.clear()
        for layer in self.streamed:
            for p, h in zip(layer.parameters(), self.views[id(layer)]):
                p.data = h

    def remove(self) -> None:
        """Remove the hooks. The streamed layers stay in CPU RAM (unregistered, one buffer each, which a
        later placement for the same device reuses): moving them onto a card they did not fit on is
        the caller's decision (`backbone.to(...)`). This object lets go of the buffers, so a layer's
        buffer lives exactly as long as the layer's parameters point into it."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.stream is not None:
            torch.cuda.current_stream(self.device).synchronize()
        self.reset()
        for r in self.pinned:
            r.release()
        self.pinned = []
        self.slots = []
        self.hosts, self.views, self.ready = {}, {}, {}
        self.backbone.streamer = None


def stream_layers(backbone: Backbone, gpu_layers: int, device=None, plan: MemoryPlan | None = None
                  ) -> LayerStreamer | None:
    """Keep `gpu_layers` decoder layers on `device` (default: where the backbone is) and stream
    the rest; with every layer resident, the backbone is just moved there (no streaming)."""
    n = len(backbone.layers)
    if gpu_layers < 0 or gpu_layers > n:
        from ..errors import SettingsError
        raise SettingsError(f"gpu_layers={gpu_layers}: use 0..{n} ({n} keeps the whole backbone on the GPU).")
    device = torch.device(device) if device is not None else backbone.device
    if backbone.streamer is not None:
        backbone.streamer.remove()
    from ..graphs import release
    release(backbone)  # a kept capture cannot run with streamed layers: its KV cache goes now
    if gpu_layers == n:
        backbone.to(device)
        return None
    streamer = LayerStreamer(backbone, device, gpu_layers, plan)
    backbone.streamer = streamer
    return streamer
