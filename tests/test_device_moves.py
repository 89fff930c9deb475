"""Moving the parts off their device leaves nothing of theirs behind there.

A memory manager (ComfyUI, or a script) offloads a part with `.to(other)` and then believes its
device memory is free. Anything the engine keeps beside the parameters (fused weight layouts,
tables, a kept capture with its own KV cache) must go with the move, or that memory stays taken
where nobody accounts for it. On a CPU, cpu -> meta stands in for cuda -> cpu: every tensor still
on the CPU after the move is one that would have stayed on the GPU.
"""
import torch

from nextstep_core import graphs
from nextstep_core.engine import SamplingSettings
from nextstep_core.pipeline import Request
from parity_support import load_pipeline


def _tensors_on(roots, device_type: str) -> list:
    """(path, tensor) for every tensor reachable from `roots` (modules, their attributes, caches and
    containers, objects' attributes) that lives on `device_type`."""
    found, seen = [], set()
    stack = [(type(r).__name__, r) for r in roots]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == device_type:
                found.append((path, obj))
            continue
        if isinstance(obj, dict):
            stack += [(f"{path}[{k!r}]", v) for k, v in obj.items()]
        elif isinstance(obj, (list, tuple, set)):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack += [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    return found


def capture_on_cpu(monkeypatch) -> list:
    """The real graphed_loop, with the capture's CUDA part skipped: its warm-up runs (laying out the
    fused weights as a real capture does), and the step it keeps (own KV cache) then replays eagerly."""
    captures = []

    def warm_up(step):
        saved = (step.hidden.clone(), step.pos.clone())
        step.body()
        step.hidden.copy_(saved[0])
        step.pos.copy_(saved[1])
        captures.append(step)
    monkeypatch.setattr(graphs, "capturable", lambda device: True)
    monkeypatch.setattr(graphs.StaticStep, "capture", warm_up)
    return captures


def test_moving_the_parts_after_a_run_leaves_no_tensor_behind(tiny_model, monkeypatch):
    pipe = load_pipeline(tiny_model)
    capture_on_cpu(monkeypatch)
    pipe.run(Request(["a red cup"], 32, 32, seed=1, sampling=SamplingSettings(steps=2, cfg=3.0)))
    bb, head = pipe.backbone, pipe.head
    assert "_kept_step" in bb.__dict__
    assert any("_qkv" in vars(layer.self_attn) for layer in bb.layers)
    before = _tensors_on([bb, head], "cpu")
    assert before  # the walk sees the parts' tensors
    bb.to("meta")
    head.to("meta")
    left = _tensors_on([bb, head], "cpu")
    assert not left, [p for p, _ in left][:10]
    assert "_kept_step" not in bb.__dict__ and "_kept_step" not in head.__dict__


def test_a_move_to_the_same_device_keeps_the_capture_and_the_next_run_gives_the_same_tokens(tiny_model, monkeypatch):
    """ComfyUI calls `.to(device)` on a part that is already there: nothing may be rebuilt then."""
    pipe = load_pipeline(tiny_model)
    captures = capture_on_cpu(monkeypatch)
    req = Request(["a red cup"], 32, 32, seed=1, sampling=SamplingSettings(steps=2, cfg=3.0))
    first = pipe.run(req).tokens
    pipe.backbone.to("cpu")
    pipe.head.to("cpu")
    assert torch.equal(pipe.run(req).tokens, first)
    assert len(captures) == 1
    pipe.head.to(torch.float64).to(torch.float32)  # a real move of the head: its kept capture goes
    assert "_kept_step" not in pipe.backbone.__dict__
    assert torch.equal(pipe.run(req).tokens, first) and len(captures) == 2


def test_a_kept_capture_goes_once_a_host_pages_the_weights(tiny_model, monkeypatch):
    """Core moves single layers when it loads a part in part (no `.to` on the whole part): the next
    run, told the weights are paged, runs eagerly and frees the capture it can no longer replay."""
    pipe = load_pipeline(tiny_model)
    capture_on_cpu(monkeypatch)
    req = Request(["a red cup"], 32, 32, seed=1, sampling=SamplingSettings(steps=2, cfg=3.0))
    pipe.run(req)
    assert "_kept_step" in pipe.backbone.__dict__
    pipe.backbone.paged = True
    pipe.run(req)
    assert "_kept_step" not in pipe.backbone.__dict__ and "_kept_step" not in pipe.head.__dict__
