"""The device check's rows. Each takes the shared state (`Check`) and a `Figures` to fill; a
comparison out of its bound or a failed check makes the row FAIL, an exception too, and `Skip`
says the row needs something this machine lacks. Every row puts the model where it needs it
itself, so any subset runs in any order.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bench.gpu_check_support import (BOUNDS, MB, PROMPT, Figures, ImageRun, PagedLayers, build,
                                     bytes_per_token, fault, free_device, module_bytes, prompt_ids, quantized_copy,
                                     run_image, sdpa_backends, write_dequantized)
from nextstep_core.devices import free_bytes

LEFT_MB = 64  # device memory an offload may leave behind (allocator rounding, small tables), in MiB
LABELS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class Skip(Exception):
    """The row needs what this machine does not have; the message says what."""


@dataclass
class Check:
    device: torch.device
    dtype: torch.dtype
    shape: dict
    steps: int
    timed: int
    faults: dict
    start_allocated: int | None = None  # device memory in use before any weight was made
    start_free: int | None = None       # devices.free_bytes then
    copy_gbps: float = float("nan")
    host_gbps: float | None = None
    parts_: tuple | None = None
    ref_: ImageRun | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def label(self) -> str:
        return LABELS.get(self.dtype, str(self.dtype))

    def bound(self, precision: str | None = None) -> float:
        return BOUNDS[precision or str(self.dtype).replace("torch.", "")]

    def parts(self, layers_on: str | None = None):
        """The full-precision backbone and head on the device, with nothing attached; the decoder
        layers on `layers_on` instead when given (moved there directly, not through the device)."""
        if self.parts_ is None:
            self.parts_ = build(self.shape, self.device, self.dtype)
        bb, head = self.parts_
        if bb.streamer is not None:
            bb.streamer.remove()
        bb.layer_runner, bb.paged, bb.run_device = None, False, None
        if layers_on is None:
            bb.to(self.device)
        else:
            release(bb)
            for name, child in bb.named_children():
                child.to(layers_on if name == "layers" else self.device)
        head.to(self.device)
        return bb, head

    def drop_parts(self) -> None:
        self.parts_ = self.ref_ = None
        free_device(self.device)

    def reference(self) -> ImageRun:
        """The resident model's eager tokens (what streamed and paged runs must give)."""
        if self.ref_ is None:
            bb, head = self.parts()
            self.ref_ = run_image(bb, head, self.steps, "off")
        return self.ref_

    def floor_ms(self, bb, head) -> float:
        return bytes_per_token(bb, head, self.steps) / (self.copy_gbps * 1e9) * 1000

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def fault(self, row: str, bb):
        return fault(self.faults.get(row), bb)


def clear_workspaces() -> None:
    """cuBLAS keeps a workspace per stream in torch's allocator; it is torch's, not the model's."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


@contextmanager
def captures_made():
    """The CUDA graph steps the engine made while inside (None for each image run eagerly)."""
    import nextstep_core.graphs as graphs
    made, real = [], graphs.graphed_loop

    def spy(*args, **kwargs):
        step = real(*args, **kwargs)
        made.append(step)
        return step
    graphs.graphed_loop = spy
    try:
        yield made
    finally:
        graphs.graphed_loop = real


def no_capture(fig: Figures, made: list, why: str) -> None:
    fig.check("no whole-step CUDA graph", bool(made) and all(m is None for m in made),
              f"{sum(m is not None for m in made)} of {len(made)} image runs captured ({why})")


def release(bb) -> None:
    from nextstep_core.graphs import release as drop
    drop(bb)


def graph(ck: Check, fig: Figures) -> None:
    """CUDA graph vs eager: the captured step (its own KV cache, the whole cache attended under a
    device mask) against the eager loop, same weights; and both speeds."""
    if not ck.cuda:
        raise Skip("needs CUDA")
    bb, head = ck.parts()
    try:
        eager = run_image(bb, head, ck.steps, "off", ck.timed)
        ck.ref_ = ck.ref_ or eager
        with ck.fault("graph", bb):
            graphed = run_image(bb, head, ck.steps, "on", ck.timed)  # "on": a failed capture fails the row
        fig.compare("CUDA graph vs eager", graphed.tokens, eager.tokens, ck.bound())
        floor = ck.floor_ms(bb, head)
        fig.speed(eager.speed(ck.label, "eager", floor))
        fig.speed(graphed.speed(ck.label, "CUDA graph", floor))
    finally:
        release(bb)  # a capture made under a fault must not be replayed later


def sdpa(ck: Check, fig: Figures) -> None:
    """Which SDPA kernel each call site gets: the prompt's prefill, the eager token step (three
    successive lengths: padding to 16 must keep the kernel), the step the CUDA graph records, and a
    Self-CoT text step (GQA attention with rows that may be masked)."""
    bb, head = ck.parts()
    dev = ck.device
    ids = prompt_ids(bb.cfg.vocab_size).to(dev)
    cache = bb.new_cache(2, bb.padded_cache_len(PROMPT + 64, False))
    e = bb.image_in_projector(torch.randn(2, bb.cfg.token_dim, device=dev).to(bb.dtype))[:, None]
    with ck.fault("sdpa", bb):
        sites = {"prefill": sdpa_backends(lambda: bb.prefill(bb.embed(ids), torch.ones_like(ids), cache, PROMPT))}
        steps = [sdpa_backends(lambda: bb.step(e, cache, cache.length + 1, fast=True)) for _ in range(3)]
        sites["token step"] = steps[0]
        pos = torch.tensor([cache.length], device=dev)
        sites["captured step"] = sdpa_backends(lambda: bb.step_at(e, cache, pos, fast=True))
        valid = torch.ones(2, dtype=torch.bool, device=dev)
        sites["Self-CoT step"] = sdpa_backends(
            lambda: bb.step(bb.embed(ids[:, :1]), cache, cache.length + 1, valid=valid))
    fig.values["sdpa"] = sites
    for site, found in sites.items():
        fig.check(f"SDPA {site}", bool(found), ", ".join(f"{k} x{v}" for k, v in found.items()) or "no SDPA op seen")
    fig.check("SDPA token step at 3 lengths", all(s == steps[0] for s in steps),
              "same kernel" if all(s == steps[0] for s in steps) else f"kernels change: {steps}")


def streamed(ck: Check, fig: Figures) -> None:
    """Layer streaming (the CLI's low-VRAM mode) vs resident: the last sixth of the layers kept in
    registered RAM and copied in per token, against the resident eager tokens."""
    from nextstep_core.weights.streaming import stream_layers
    ref = ck.reference()
    bb, head = ck.parts()
    n = bb.cfg.num_layers
    k = max(1, n // 6)
    streamer = None
    try:
        streamer = stream_layers(bb, n - k, ck.device)
        with captures_made() as made, ck.fault("streamed", bb):
            run = run_image(bb, head, ck.steps, "auto", ck.timed)
        fig.compare("streamed vs resident", run.tokens, ref.tokens, ck.bound())
        no_capture(fig, made, "layers streamed")
        moved = module_bytes(*bb.layers[n - k:])
        fig.values.update(streamed_layers=k, layers=n, streamed_gb_per_token=moved / 1e9)
        floor = ck.floor_ms(bb, head)
        if ck.host_gbps:
            floor = max(floor, moved / (ck.host_gbps * 1e9) * 1000)
        fig.speed(run.speed(ck.label, f"eager, {k}/{n} layers streamed", floor))
    finally:
        if streamer is not None:
            streamer.remove()


def offload(ck: Check, fig: Figures) -> None:
    """An offload frees the GPU: device memory before the weights were made, after an image (with its
    kept CUDA graph and that graph's own KV cache), and after moving backbone and head to the CPU."""
    if not ck.cuda:
        raise Skip("needs CUDA")
    bb, head = ck.parts()
    loaded = ck.allocated()
    with ck.fault("offload", bb):
        run_image(bb, head, ck.steps, "auto")
    after_run = ck.allocated()
    bb.to("cpu")
    head.to("cpu")
    free_device(ck.device)
    clear_workspaces()
    left = ck.allocated() - ck.start_allocated
    free = free_bytes(ck.device)  # what the memory plan (and a host asking torch) sees as free now
    fig.values.update(start_mb=ck.start_allocated / MB, loaded_mb=loaded / MB, after_image_mb=after_run / MB,
                      after_offload_mb=(left + ck.start_allocated) / MB, left_mb=left / MB,
                      free_at_start_mb=ck.start_free / MB, free_after_offload_mb=free / MB)
    fig.check("offload frees the GPU", left <= LEFT_MB * MB,
              f"{left / MB:.1f} MB left of {loaded / MB:.0f} MB loaded, {(after_run - loaded) / MB:.0f} MB more "
              f"after an image (allowed {LEFT_MB} MB); free {ck.start_free / MB:.0f} MB at the start, "
              f"{free / MB:.0f} MB after the offload (CUDA's lazily loaded kernels take some)")


def paged(ck: Check, fig: Figures) -> None:
    """Weights paged in per layer by a host (what ComfyUI's dynamic VRAM does, as far as it runs
    without ComfyUI): decoder layers in RAM, `run_device` set, a `layer_runner` that copies each
    layer in right before it runs, `paged=True`. Must give the resident tokens, make no whole-step
    CUDA graph, and leave no layer on the device."""
    ref = ck.reference()
    bb, head = ck.parts(layers_on="cpu")
    free_device(ck.device)
    runner = PagedLayers(ck.device)
    bb.run_device, bb.layer_runner, bb.paged = ck.device, runner, True
    before = ck.allocated() if ck.cuda else 0
    try:
        with captures_made() as made, ck.fault("paged", bb):
            run = run_image(bb, head, ck.steps, "auto")
        fig.compare("paged vs resident", run.tokens, ref.tokens, ck.bound())
        no_capture(fig, made, "paged=True")
        fig.check("layers paged in", runner.layers_run >= bb.cfg.num_layers, f"{runner.layers_run} layer runs")
        home = {p.device.type for p in bb.layers.parameters()}
        fig.check("weights back in RAM", home == {"cpu"}, f"decoder weights on {sorted(home)} after the run")
        if ck.cuda:
            free_device(ck.device)
            left = ck.allocated() - before
            fig.values["left_mb"] = left / MB
            fig.check("nothing paged stays", left <= LEFT_MB * MB, f"{left / MB:.1f} MB more on the device after "
                      f"the run (allowed {LEFT_MB} MB)")
        fig.values["prefill_s"] = run.prefill_s
    finally:
        bb.run_device, bb.layer_runner, bb.paged = None, None, False


def kernels(fmt: str):
    def row(ck: Check, fig: Figures) -> None:
        bb, head = ck.parts()
        qb = None
        try:
            qb = quantized_copy(bb, fmt)
            fig.values["matrices"] = write_dequantized(qb, bb)
            ck.ref_ = None  # bb now holds the dequantized weights
            ref = run_image(bb, head, ck.steps, "off")
            with ck.fault(fmt, qb):
                got = run_image(qb, head, ck.steps, "off", ck.timed)
            precision = "fp8" if fmt == "fp8" else "bfloat16" if fmt == "int4" else None  # what activations pass
            m = qb.layers[0].mlp.up_proj  # what it chose, read after its first use (int4 picks then on a CPU)
            fig.values["kernel"] = {a: str(getattr(m, a)) for a in ("path", "scaled_mm", "kernel") if hasattr(m, a)}
            print(f"    {type(m).__name__}, kernel choice: {fig.values['kernel'] or 'not reported'}", flush=True)
            if ck.cuda:  # a probe that turned the kernel off would make the comparison below dequantized twice
                used = {"int4": m.__dict__.get("kernel") == "cuda", "fp8": bool(getattr(m, "scaled_mm", False)),
                        "int8": getattr(m, "path", None) in ("compiled", "buffer")}[fmt]
                fig.check(f"{fmt} runs its CUDA path", used, str(fig.values["kernel"] or "not reported"))
            fig.compare(f"{fmt} kernels vs dequantized", got.tokens, ref.tokens, ck.bound(precision))
            floor = ck.floor_ms(qb, head)
            fig.speed(got.speed(fmt, "eager", floor))
            if ck.cuda:
                graphed = run_image(qb, head, ck.steps, "on", ck.timed)
                fig.compare(f"{fmt} CUDA graph vs eager", graphed.tokens, got.tokens, ck.bound(precision))
                fig.speed(graphed.speed(fmt, "CUDA graph", floor))
        finally:
            if qb is not None:
                release(qb)
            qb = None
            free_device(ck.device)
    row.__doc__ = (f"{fmt} decoder weights (quantized at load): the device's kernels against the same "
                   f"weights dequantized into {{dtype}} matrices, and the {fmt} speed.")
    return row


ROWS = {"graph": graph, "sdpa": sdpa, "streamed": streamed, "offload": offload, "paged": paged,
        "int8": kernels("int8"), "fp8": kernels("fp8"), "int4": kernels("int4")}
