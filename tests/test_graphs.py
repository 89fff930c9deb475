"""The capturable per-token step (`StaticStep`) against the plain loop. On CPU the step runs
eagerly, which checks everything the CUDA graph records; the capture itself runs where CUDA is."""
import pytest
import torch

from nextstep_core import graphs
from nextstep_core.engine import Execution, SamplingSettings
from nextstep_core.pipeline import Request
from nextstep_core.story import StorySettings, Storyboard
from parity_support import assert_tokens_close

EXACT = Execution(exact=True)


def eager_static(monkeypatch):
    def make(loop, hidden, cache, cfg_mult, n_tokens):
        from nextstep_core.samplers import draws_per_token
        shape = (draws_per_token(loop.s.sampler, loop.s.steps), hidden.shape[0] // cfg_mult, loop.bb.cfg.token_dim)
        return graphs.StaticStep(loop, hidden, cache, cfg_mult, shape)
    monkeypatch.setattr(graphs, "graphed_loop", make)


@pytest.mark.parametrize("sampler,schedule", [("nextstep1", "linear"), ("nextstep1.1", "constant")])
def test_static_step_equals_the_plain_exact_loop(tiny_pipeline, monkeypatch, sampler, schedule):
    s = SamplingSettings(steps=3, cfg=3.0, sampler=sampler, cfg_schedule=schedule, use_norm=True)
    req = Request(["a", "b"], 48, 32, seed=8, sampling=s, images_per_prompt=2, execution=EXACT)
    plain = tiny_pipeline.run(req)
    eager_static(monkeypatch)
    static = tiny_pipeline.run(req)
    assert_tokens_close(static.tokens, plain.tokens)


def test_static_step_leaves_the_cache_ready_to_continue_a_story(tiny_pipeline, monkeypatch):
    s = SamplingSettings(steps=2, cfg=2.0)
    board = Storyboard(tiny_pipeline)
    plain = board.run(["one", "two"], StorySettings(32, 32, s, execution=EXACT), seed=1)
    eager_static(monkeypatch)
    static = board.run(["one", "two"], StorySettings(32, 32, s, execution=EXACT), seed=1)
    assert_tokens_close(static[1].tokens, plain[1].tokens)
    assert static[1].context.length == plain[1].context.length


def test_graphs_on_without_cuda_warns_and_runs(tiny_pipeline):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        tiny_pipeline.run(Request(["x"], 32, 32, sampling=SamplingSettings(steps=2),
                                  execution=Execution(cuda_graphs="on")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replay_equals_eager_on_gpu(tiny_model):
    from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae
    from nextstep_core.pipeline import NextStepPipeline
    bb, tok = load_backbone(tiny_model, "cuda", torch.float32)
    pipe = NextStepPipeline(bb, tok, load_flow_head(tiny_model, "cuda"), load_vae(tiny_model, "cuda"))
    s = SamplingSettings(steps=4, cfg=4.0)
    req = lambda mode: Request(["x"], 64, 64, seed=3, sampling=s, execution=Execution(exact=True, cuda_graphs=mode))
    torch.testing.assert_close(pipe.run(req("on")).tokens, pipe.run(req("off")).tokens, atol=1e-5, rtol=0)


def test_torch_compile_of_the_head_step_is_optional_and_exact(tiny_pipeline):
    """Traced by dynamo (the cheap 'eager' backend here; users pick inductor): same tokens."""
    s = SamplingSettings(steps=2, cfg=3.0)
    req = lambda **k: Request(["x"], 32, 32, seed=4, sampling=s, execution=Execution(exact=True, **k))
    torch.testing.assert_close(tiny_pipeline.run(req(compile="eager")).tokens, tiny_pipeline.run(req()).tokens,
                               atol=1e-6, rtol=0)


def kept_captures(monkeypatch):
    """The real graphed_loop with its capture replaced by nothing (the step then replays eagerly):
    everything around the capture (keeping, matching, copying the cache in and out) runs on CPU."""
    captures = []
    monkeypatch.setattr(graphs, "capturable", lambda device: True)
    monkeypatch.setattr(graphs.StaticStep, "capture", lambda self: captures.append(self))
    return captures


def test_a_capture_is_kept_for_the_next_image_with_the_same_shapes(tiny_pipeline, monkeypatch):
    s = SamplingSettings(steps=3, cfg=3.0, use_norm=True)
    req = lambda seed, w=48: Request(["a", "b"], w, 32, seed=seed, sampling=s, execution=EXACT)
    plain = [tiny_pipeline.run(req(seed)).tokens for seed in (1, 2)]
    other = tiny_pipeline.run(req(3, 32)).tokens
    captures = kept_captures(monkeypatch)
    try:
        kept = [tiny_pipeline.run(req(seed)).tokens for seed in (1, 2)]
        assert len(captures) == 1  # the second image replayed the first one's capture
        assert torch.equal(kept[0], plain[0]) and torch.equal(kept[1], plain[1])
        assert torch.equal(tiny_pipeline.run(req(3, 32)).tokens, other) and len(captures) == 2  # new shape
        bb = tiny_pipeline.backbone
        w = bb.layers[0].mlp.down_proj.weight
        w.data = w.data.clone()  # as a move to another device and back leaves it: new addresses
        assert torch.equal(tiny_pipeline.run(req(3, 32)).tokens, other) and len(captures) == 3
    finally:
        graphs.release(tiny_pipeline.backbone)
    assert "_kept_step" not in tiny_pipeline.backbone.__dict__


def test_a_kept_capture_hands_its_slots_back_to_a_story(tiny_pipeline, monkeypatch):
    s = SamplingSettings(steps=2, cfg=2.0)
    board = Storyboard(tiny_pipeline)
    plain = board.run(["one", "two", "three"], StorySettings(32, 32, s, execution=EXACT), seed=1)
    kept_captures(monkeypatch)
    try:
        kept = board.run(["one", "two", "three"], StorySettings(32, 32, s, execution=EXACT), seed=1)
    finally:
        graphs.release(tiny_pipeline.backbone)
    for a, b in zip(kept, plain):
        assert torch.equal(a.tokens, b.tokens) and a.context.length == b.context.length


def test_no_memory_for_the_captures_own_cache_falls_back_to_eager(tiny_pipeline, monkeypatch):
    """The capture's KV cache is an optimisation's: failing to allocate it must not fail the run."""
    from nextstep_core.backbone import Backbone
    s = SamplingSettings(steps=2, cfg=3.0)
    req = Request(["a", "b"], 32, 32, seed=6, sampling=s, execution=EXACT)
    plain = tiny_pipeline.run(req).tokens
    captures = kept_captures(monkeypatch)
    real = Backbone.new_cache

    def no_room_for_a_second(self, batch, max_len):
        if not hasattr(self, "_one_cache_given"):
            self._one_cache_given = True
            return real(self, batch, max_len)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    monkeypatch.setattr(Backbone, "new_cache", no_room_for_a_second)
    try:
        with pytest.warns(UserWarning, match="running eagerly"):
            got = tiny_pipeline.run(req).tokens
    finally:
        del tiny_pipeline.backbone._one_cache_given
        graphs.release(tiny_pipeline.backbone)
    assert torch.equal(got, plain) and not captures


def test_compiled_head_step_compiles_once_for_every_prompt_length(tiny_pipeline):
    """dynamo guards on its inputs' strides and on the attributes it creates: the hidden state a
    prompt leaves must not carry the prompt's length in its strides, and nothing may be created
    inside the traced step, or each new prompt (and the first step after it) compiles again."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    s = SamplingSettings(steps=2, cfg=3.0)
    for seed, prompt in enumerate(["a", "a red cup on a table by the sea", "x y", "one two three four five"]):
        tiny_pipeline.run(Request([prompt], 32, 32, seed=seed, sampling=s, execution=Execution(compile="eager")))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()
