"""The capturable per-token step (`StaticStep`) against the plain loop. On CPU the step runs
eagerly, which checks everything the CUDA graph records; the capture itself runs where CUDA is."""
import pytest
import torch

from nextstep_core import graphs
from nextstep_core.engine import SamplingSettings
from nextstep_core.pipeline import Request
from nextstep_core.story import Storyboard
from parity_support import assert_tokens_close


def eager_static(monkeypatch):
    def make(loop, hidden, cache, cfg_mult, n_tokens):
        from nextstep_core.samplers import draws_per_token
        shape = (draws_per_token(loop.s.sampler, loop.s.steps), hidden.shape[0] // cfg_mult, loop.bb.cfg.token_dim)
        return graphs.StaticStep(loop, hidden, cache, cfg_mult, shape)
    monkeypatch.setattr(graphs, "graphed_loop", make)


@pytest.mark.parametrize("sampler,schedule", [("nextstep1", "linear"), ("nextstep1.1", "constant")])
def test_static_step_equals_the_plain_exact_loop(tiny_pipeline, monkeypatch, sampler, schedule):
    s = SamplingSettings(steps=3, cfg=3.0, sampler=sampler, cfg_schedule=schedule, use_norm=True, exact=True)
    req = Request(["a", "b"], 48, 32, seed=8, sampling=s, images_per_prompt=2)
    plain = tiny_pipeline.run(req)
    eager_static(monkeypatch)
    static = tiny_pipeline.run(req)
    assert_tokens_close(static.tokens, plain.tokens)


def test_static_step_leaves_the_cache_ready_to_continue_a_story(tiny_pipeline, monkeypatch):
    s = SamplingSettings(steps=2, cfg=2.0, exact=True)
    board = Storyboard(tiny_pipeline)
    plain = board.run(["one", "two"], width=32, height=32, seed=1, sampling=s)
    eager_static(monkeypatch)
    static = board.run(["one", "two"], width=32, height=32, seed=1, sampling=s)
    assert_tokens_close(static[1].tokens, plain[1].tokens)
    assert static[1].context.length == plain[1].context.length


def test_graphs_on_without_cuda_warns_and_runs(tiny_pipeline):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        tiny_pipeline.run(Request(["x"], 32, 32, sampling=SamplingSettings(steps=2, cuda_graphs="on")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replay_equals_eager_on_gpu(tiny_model):
    from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae
    from nextstep_core.pipeline import NextStepPipeline
    bb, tok = load_backbone(tiny_model, "cuda", torch.float32)
    pipe = NextStepPipeline(bb, tok, load_flow_head(tiny_model, "cuda"), load_vae(tiny_model, "cuda"))
    base = dict(steps=4, cfg=4.0, exact=True)
    req = lambda mode: Request(["x"], 64, 64, seed=3, sampling=SamplingSettings(cuda_graphs=mode, **base))
    torch.testing.assert_close(pipe.run(req("on")).tokens, pipe.run(req("off")).tokens, atol=1e-5, rtol=0)


def test_torch_compile_of_the_head_step_is_optional_and_exact(tiny_pipeline):
    """Traced by dynamo (the cheap 'eager' backend here; users pick inductor): same tokens."""
    base = dict(steps=2, cfg=3.0, exact=True)
    req = lambda **k: Request(["x"], 32, 32, seed=4, sampling=SamplingSettings(**base, **k))
    torch.testing.assert_close(tiny_pipeline.run(req(compile="eager")).tokens, tiny_pipeline.run(req()).tokens,
                               atol=1e-6, rtol=0)
