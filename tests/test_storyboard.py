"""Storyboards: panels continue one sequence; chained panels equal the single-node run."""
import pytest
import torch

from nextstep_core.engine import SamplingSettings
from nextstep_core.errors import SettingsError
from nextstep_core.pipeline import Request
from nextstep_core.story import Storyboard
from parity_support import assert_tokens_close

S = SamplingSettings(steps=3, cfg=4.0)
PANELS = ["a knight wakes up", "the knight meets a dragon", "they share tea"]


def test_chained_panels_equal_the_single_run(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    single = board.run(PANELS, width=32, height=32, seed=9, sampling=S, negative="blurry", style="ink drawing")
    ctx = board.start(cfg=S.cfg, negative="blurry", style="ink drawing")
    for i, (prompt, want) in enumerate(zip(PANELS, single)):
        panel = board.add_panel(ctx, prompt, width=32, height=32, seed=9 + i, sampling=S)
        assert_tokens_close(panel.tokens, want.tokens)
        ctx = panel.context


def test_first_panel_is_a_plain_text_to_image_run(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    first = board.run(PANELS[:1], width=32, height=48, seed=3, sampling=S, negative="blurry")[0]
    plain = tiny_pipeline.run(Request([PANELS[0]], 32, 48, negative="blurry", seed=3, sampling=S))
    assert_tokens_close(first.tokens, plain.tokens)


def test_later_panels_see_the_story(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    story = board.run(PANELS[:2], width=32, height=32, seed=1, sampling=S)
    alone = tiny_pipeline.run(Request([PANELS[1]], 32, 32, seed=2, sampling=S))
    assert not torch.allclose(story[1].tokens, alone.tokens, atol=1e-3)


def test_branches_from_one_context_do_not_disturb_each_other(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    two = board.run(PANELS[:2], width=32, height=32, seed=4, sampling=S)[1].context
    before = two.cache.keys[0].clone()
    a1 = board.add_panel(two, "branch A", width=32, height=32, seed=7, sampling=S)
    board.add_panel(two, "branch B", width=32, height=32, seed=7, sampling=S)
    a2 = board.add_panel(two, "branch A", width=32, height=32, seed=7, sampling=S)
    assert torch.equal(two.cache.keys[0], before)
    assert torch.equal(a1.tokens, a2.tokens)


def test_reused_context_equals_recomputing_it(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    ctx = board.run(PANELS[:2], width=32, height=32, seed=5, sampling=S)[-1].context
    fresh = board.recompute(ctx)
    n = ctx.cache.length
    assert fresh.length == n and torch.equal(fresh.valid[:, :n], ctx.cache.valid[:, :n])
    real = ctx.cache.valid[:, None, :n, None]  # pad slots hold unused values in both
    torch.testing.assert_close(fresh.keys[-1][:, :, :n] * real, ctx.cache.keys[-1][:, :, :n] * real, atol=1e-4, rtol=0)


def test_limits_and_empty_panels_are_reported_before_work(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    with pytest.raises(SettingsError, match="no panels"):
        board.run(["", "  "], width=32, height=32, seed=1, sampling=S)
    limit = tiny_pipeline.backbone.cfg.max_position_embeddings
    with pytest.raises(SettingsError, match=f"limit is {limit}"):
        board.run(["p"] * 40, width=256, height=256, seed=1, sampling=S)
    ctx = board.start(cfg=S.cfg)
    with pytest.raises(SettingsError, match="Panel 1 has an empty prompt"):
        board.add_panel(ctx, " ", width=32, height=32, seed=1, sampling=S)


def test_a_context_offloaded_to_cpu_continues_identically(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    ctx = board.run(PANELS[:1], width=32, height=32, seed=6, sampling=S)[0].context
    parked = ctx.offloaded()
    assert parked.cache.max_len == ctx.cache.length
    a = board.add_panel(ctx, "next", width=32, height=32, seed=7, sampling=S)
    b = board.add_panel(parked, "next", width=32, height=32, seed=7, sampling=S)
    assert_tokens_close(a.tokens, b.tokens)
