"""What the CUDA paths ask of torch.cuda, checked on a CPU with a recording stand-in.

Nothing here runs on a GPU: torch.cuda's functions are replaced by fakes that note which device
each call was made for (its explicit argument, or else the current device set by
`torch.cuda.device`). That is what decides where a stream, a capture or a page-lock lands when the
run's device is cuda:1. That the calls then work on real hardware is for bench/gpu_check.py.
"""
import contextlib
import types

import pytest
import torch

from nextstep_core import graphs
from nextstep_core.engine import Execution, SamplingSettings
from nextstep_core.pipeline import Request
from parity_support import assert_tokens_close

RUN = torch.device("cuda", 1)


class FakeCuda:
    """torch.cuda's device-dependent calls, noting (call, device index) for each."""

    def __init__(self):
        self.current = 0
        self.calls = []
        self.modes = []
        fake = self

        class Stream:
            def __init__(self, device=None, **_):
                self.device = torch.device("cuda", fake.index(device))
                fake.note("Stream", device)

            def wait_stream(self, other):
                fake.note("wait_stream", self.device)

            def synchronize(self):
                fake.note("stream.synchronize", self.device)
        self.Stream = Stream

    def index(self, device=None) -> int:
        if device is None:
            return self.current
        d = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        return self.current if d.index is None else d.index

    def note(self, what, device=None):
        self.calls.append((what, self.index(device)))

    @contextlib.contextmanager
    def device(self, dev):
        before, self.current = self.current, self.index(dev)
        try:
            yield
        finally:
            self.current = before

    def current_stream(self, device=None):
        s = self.Stream.__new__(self.Stream)
        s.device = torch.device("cuda", self.index(device))
        self.note("current_stream", device)
        return s

    @contextlib.contextmanager
    def stream(self, s):
        self.note("stream", s.device)  # torch's StreamContext switches to the stream's device
        before, self.current = self.current, s.device.index
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def graph(self, g, pool=None, stream=None, capture_error_mode="global"):
        # without a stream, torch captures on a stream it made once on the device current at first use
        self.note("graph", stream.device if stream is not None else 0)
        self.modes.append(capture_error_mode)
        yield

    def CUDAGraph(self):
        self.note("CUDAGraph")
        return types.SimpleNamespace(replay=lambda: None)

    def synchronize(self, device=None):
        self.note("synchronize", device)

    def cudart(self):
        return types.SimpleNamespace(cudaHostRegister=lambda ptr, n, flags: self.note("cudaHostRegister") or 0,
                                     cudaHostUnregister=lambda ptr: self.note("cudaHostUnregister") or 0)

    def install(self, monkeypatch):
        for name in ("Stream", "current_stream", "stream", "graph", "CUDAGraph", "synchronize", "cudart", "device"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        return self


def test_capture_runs_every_call_on_the_runs_device(monkeypatch):
    cuda = FakeCuda().install(monkeypatch)
    step = graphs.StaticStep.__new__(graphs.StaticStep)
    step.hidden, step.pos, step.device = torch.zeros(2, 4), torch.zeros(1, dtype=torch.long), RUN
    step.body = lambda: cuda.note("step")
    step.capture()
    assert [c for c, _ in cuda.calls].count("step") == 2  # warm-up, then the recorded step
    assert "graph" in [c for c, _ in cuda.calls]
    assert all(dev == 1 for _, dev in cuda.calls), cuda.calls
    assert cuda.modes == ["thread_local"]  # other threads of the host process may call CUDA meanwhile


def test_host_buffers_are_page_locked_for_the_streaming_device(monkeypatch):
    from nextstep_core.weights.streaming import _Registered
    cuda = FakeCuda().install(monkeypatch)
    r = _Registered(torch.empty(64, dtype=torch.uint8), RUN)
    r.release()
    assert cuda.calls == [("cudaHostRegister", 1), ("cudaHostUnregister", 1)]


def test_free_memory_counts_the_allocators_unused_blocks(monkeypatch):
    """ComfyUI's default allocator (cudaMallocAsync) keeps freed blocks in its pool, as the native
    one caches them: either way they serve our next allocation but mem_get_info does not see them."""
    from nextstep_core.devices import free_bytes
    asked = []

    def info(dev):
        asked.append(torch.device(dev))
        return 3 * 2**30, 24 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 8 * 2**30)
    assert free_bytes(RUN) == 5 * 2**30 and asked == [RUN]
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 11 * 2**30)  # never below mem_get_info
    assert free_bytes(RUN) == 3 * 2**30
    assert free_bytes("cpu") is None


def test_no_room_for_the_captures_cache_runs_eagerly_without_trying(tiny_pipeline, monkeypatch):
    from nextstep_core import devices
    req = Request(["a"], 32, 32, seed=2, sampling=SamplingSettings(steps=2, cfg=3.0))
    plain = tiny_pipeline.run(req).tokens
    tried = []
    monkeypatch.setattr(graphs, "capturable", lambda device: True)
    monkeypatch.setattr(graphs.StaticStep, "capture", lambda self: tried.append(self))
    monkeypatch.setattr(devices, "free_bytes", lambda device: 1024)
    with pytest.warns(UserWarning, match="No room .* for the CUDA graph's own KV cache"):
        got = tiny_pipeline.run(req).tokens
    assert torch.equal(got, plain) and not tried and "_kept_step" not in tiny_pipeline.backbone.__dict__


class _Recording:
    """torch.nn.functional as the backbone sees it, noting the key length of every attention call."""

    def __init__(self):
        self.lengths = []

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def scaled_dot_product_attention(self, q, k, v, *a, **kw):
        self.lengths.append(k.shape[-2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, *a, **kw)


def test_attended_lengths_are_multiples_of_16_where_padding_applies(tiny_pipeline, monkeypatch):
    """Prefill, every token step, Self-CoT and storyboard panels attend padded lengths (the spare
    slots masked: the same tokens up to rounding); the parity path attends exactly as before."""
    from nextstep_core import backbone
    from nextstep_core.reasoning import ReasoningSettings
    from nextstep_core.story import StorySettings, Storyboard
    fast = SamplingSettings(steps=2, cfg=3.0)
    t2i = Request(["a red cup"], 48, 32, seed=4, sampling=fast)
    cot = Request(["a red cup"], 32, 32, seed=4, sampling=fast, reasoning=ReasoningSettings(mode="think", max_tokens=3))
    exact = Request(["a red cup"], 48, 32, seed=4, sampling=fast, execution=Execution(exact=True))
    board = Storyboard(tiny_pipeline)
    story = lambda: board.run(["one", "two"], StorySettings(32, 32, fast), seed=1)  # noqa: E731
    before = [tiny_pipeline.run(r).tokens for r in (t2i, cot, exact)] + [p.tokens for p in story()]
    rec = _Recording()
    monkeypatch.setattr(backbone, "F", rec)
    monkeypatch.setattr(backbone, "pads_attention", lambda device: True)
    after = [tiny_pipeline.run(r).tokens for r in (t2i, cot)]
    padded = list(rec.lengths)
    assert padded and all(n % 16 == 0 for n in padded), padded
    after.append(tiny_pipeline.run(exact).tokens)
    assert any(n % 16 for n in rec.lengths[len(padded):])  # the parity path is not padded
    rec.lengths.clear()
    after += [p.tokens for p in story()]
    assert rec.lengths and all(n % 16 == 0 for n in rec.lengths), rec.lengths
    for a, b in zip(after, before):
        assert_tokens_close(a, b)
    assert torch.equal(after[2], before[2])
