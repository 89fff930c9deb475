"""Storyboards: panels continue one sequence; chained panels equal the single-node run."""
import pytest
import torch

from nextstep_core.engine import SamplingSettings
from nextstep_core.errors import SettingsError
from nextstep_core.pipeline import Request
from nextstep_core.story import StorySettings, Storyboard
from parity_support import assert_tokens_close

S = SamplingSettings(steps=3, cfg=4.0)
PANELS = ["a knight wakes up", "the knight meets a dragon", "they share tea"]


def test_chained_panels_equal_the_single_run(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    single = board.run(PANELS, StorySettings(32, 32, S, negative="blurry", style="ink drawing"), seed=9)
    ctx = board.start(StorySettings(32, 32, S, negative="blurry", style="ink drawing"))
    for i, (prompt, want) in enumerate(zip(PANELS, single)):
        panel = board.add_panel(ctx, prompt, seed=9 + i)
        assert_tokens_close(panel.tokens, want.tokens)
        ctx = panel.context


def test_first_panel_is_a_plain_text_to_image_run(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    first = board.run(PANELS[:1], StorySettings(32, 48, S, negative="blurry"), seed=3)[0]
    plain = tiny_pipeline.run(Request([PANELS[0]], 32, 48, negative="blurry", seed=3, sampling=S))
    assert_tokens_close(first.tokens, plain.tokens)


def test_later_panels_see_the_story(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    story = board.run(PANELS[:2], StorySettings(32, 32, S), seed=1)
    alone = tiny_pipeline.run(Request([PANELS[1]], 32, 32, seed=2, sampling=S))
    assert not torch.allclose(story[1].tokens, alone.tokens, atol=1e-3)


def test_branches_from_one_context_do_not_disturb_each_other(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    two = board.run(PANELS[:2], StorySettings(32, 32, S), seed=4)[1].context
    before = two.cache.keys[0].clone()
    a1 = board.add_panel(two, "branch A", seed=7)
    board.add_panel(two, "branch B", seed=7)
    a2 = board.add_panel(two, "branch A", seed=7)
    assert torch.equal(two.cache.keys[0], before)
    assert torch.equal(a1.tokens, a2.tokens)


def test_reused_context_equals_recomputing_it(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    ctx = board.run(PANELS[:2], StorySettings(32, 32, S), seed=5)[-1].context
    fresh = board.recompute(ctx)
    n = ctx.cache.length
    assert fresh.length == n and torch.equal(fresh.valid[:, :n], ctx.cache.valid[:, :n])
    real = ctx.cache.valid[:, None, :n, None]  # pad slots hold unused values in both
    torch.testing.assert_close(fresh.keys[-1][:, :, :n] * real, ctx.cache.keys[-1][:, :, :n] * real, atol=1e-4, rtol=0)


def test_limits_and_empty_panels_are_reported_before_work(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    with pytest.raises(SettingsError, match="no panels"):
        board.run(["", "  "], StorySettings(32, 32, S), seed=1)
    limit = tiny_pipeline.backbone.cfg.max_position_embeddings
    with pytest.raises(SettingsError, match=f"limit is {limit}"):
        board.run(["p"] * 40, StorySettings(256, 256, S), seed=1)
    ctx = board.start(StorySettings(32, 32, S))
    with pytest.raises(SettingsError, match="Panel 1 has an empty prompt"):
        board.add_panel(ctx, " ", seed=1)


def test_a_context_offloaded_to_cpu_continues_identically(tiny_pipeline):
    board = Storyboard(tiny_pipeline)
    ctx = board.run(PANELS[:1], StorySettings(32, 32, S), seed=6)[0].context
    parked = ctx.offloaded()
    assert parked.cache.max_len == ctx.cache.length
    a = board.add_panel(ctx, "next", seed=7)
    b = board.add_panel(parked, "next", seed=7)
    assert_tokens_close(a.tokens, b.tokens)


@pytest.mark.parametrize("mode", ["story", "edit chain"])
def test_a_story_checks_its_size_once_when_it_starts(tiny_edit_model, monkeypatch, mode):
    """Each setting is checked in one place: the story's size when the story starts, never again per
    panel (an edit-chain panel edits the previous panel at its size)."""
    import nextstep_core.limits as limits
    import nextstep_core.pipeline as pipeline_module
    import nextstep_core.story as story_module
    from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae
    bb, tok = load_backbone(tiny_edit_model)
    pipe = pipeline_module.NextStepPipeline(bb, tok, load_flow_head(tiny_edit_model), load_vae(tiny_edit_model))
    calls = []

    def counted(*args):
        calls.append(args)
        return limits.check_size(*args)
    for module in (story_module, pipeline_module):
        monkeypatch.setattr(module, "check_size", counted)
    monkeypatch.setattr(pipeline_module, "size_problem", lambda *a: calls.append(a) or limits.size_problem(*a))
    sampling = SamplingSettings(steps=2, cfg=2.0, cfg_img=1.5)
    panels = Storyboard(pipe).run(PANELS[:3], StorySettings(32, 48, sampling, mode=mode), seed=1)
    assert calls == [(32, 48)]
    assert [tuple(p.image.shape) for p in panels] == [(1, 48, 32, 3)] * 3 and panels[-1].context.panels == 3
    assert (panels[-1].context.last_image is not None) == (mode == "edit chain")
    with pytest.raises(SettingsError, match=r"^height=40 is not a multiple of 16"):
        StorySettings(32, 40, sampling, mode=mode)
    with pytest.raises(SettingsError, match=r"^mode='comic'; choose one of story, edit chain"):
        StorySettings(32, 32, sampling, mode="comic")
