"""Self-CoT: the model reasons in a thinking span before it draws."""
import pytest
import torch

from nextstep_core.engine import SamplingSettings
from nextstep_core.errors import SettingsError
from nextstep_core.pipeline import Request
from nextstep_core.prompts import build_rows
from nextstep_core.reasoning import ReasoningSettings
from nextstep_core.tokenizer import BOT, EOT
from parity_support import assert_tokens_close

QUICK = SamplingSettings(steps=3, cfg=4.0)


def req(reasoning=ReasoningSettings(), prompt="a red cube", **kw):
    return Request([prompt], 32, 32, negative="blurry", seed=11, sampling=QUICK, reasoning=reasoning, **kw)


def test_forced_reasoning_equals_a_plain_run_with_that_text_in_the_prompt(tiny_pipeline):
    text = "the cube sits on a table"
    forced = tiny_pipeline.run(req(ReasoningSettings(mode="think", text=text)))
    plain = tiny_pipeline.run(req(prompt=f"a red cube{BOT}{text}{EOT}"))
    assert_tokens_close(forced.tokens, plain.tokens)  # prefilled in other blocks: rounding only
    assert forced.reasoning == [text]
    # the unconditional row is the plain negative prompt: it never sees the reasoning
    assert forced.rows.texts[1] == "blurry" and text in forced.rows.texts[0]


class _Fixed(torch.nn.Module):
    """An LM head that always prefers one token, to steer where the span ends."""

    def __init__(self, vocab, token):
        super().__init__()
        self.vocab, self.token = vocab, token

    def forward(self, h):
        out = torch.zeros(h.shape[:-1] + (self.vocab,), dtype=h.dtype)
        out[..., self.token] = 1.0
        return out


def test_stops_at_the_end_token_and_at_the_limit(tiny_pipeline):
    bb, tok = tiny_pipeline.backbone, tiny_pipeline.tokenizer
    old = bb.lm_head
    try:
        bb.lm_head = _Fixed(bb.cfg.vocab_size, tok.id_of(EOT))
        assert tiny_pipeline.run(req(ReasoningSettings(mode="think", max_tokens=5))).reasoning == [""]
        bb.lm_head = _Fixed(bb.cfg.vocab_size, tok.encode("a")[0])
        out = tiny_pipeline.run(req(ReasoningSettings(mode="think", max_tokens=5)))
        assert out.reasoning == ["aaaaa"]
    finally:
        bb.lm_head = old


def test_generated_reasoning_continues_on_the_same_cache_like_a_forced_run(tiny_pipeline):
    """Reasoning written token by token, then the image on the same cache, equals the run that
    is given the same text up front (up to float rounding: one path steps, the other prefills)."""
    bb, tok = tiny_pipeline.backbone, tiny_pipeline.tokenizer
    old = bb.lm_head
    try:
        bb.lm_head = _Fixed(bb.cfg.vocab_size, tok.encode("a")[0])
        gen = tiny_pipeline.run(req(ReasoningSettings(mode="think", max_tokens=4)))
    finally:
        bb.lm_head = old
    assert gen.reasoning == ["aaaa"]
    forced = tiny_pipeline.run(req(ReasoningSettings(mode="think", text="aaaa")))
    torch.testing.assert_close(gen.tokens, forced.tokens, atol=1e-4, rtol=0)


def test_random_model_reasoning_runs_end_to_end(tiny_pipeline):
    out = tiny_pipeline.run(req(ReasoningSettings(mode="think", max_tokens=6, temperature=0.8)))
    assert len(out.reasoning) == 1 and out.tokens.shape == (1, 4, 64)


def test_the_unconditional_rows_are_unchanged_by_reasoning(tiny_pipeline):
    """Their hidden states at the image start equal a plain run's (only the conditional rows reason)."""
    captured = {}
    from nextstep_core import engine

    orig = engine.TokenLoop.run

    def spy(self, hidden, *a, **k):
        captured.setdefault("h", []).append(hidden.clone())
        return orig(self, hidden, *a, **k)

    engine.TokenLoop.run = spy
    try:
        tiny_pipeline.run(req(ReasoningSettings(mode="think", max_tokens=4)))
        tiny_pipeline.run(req())
    finally:
        engine.TokenLoop.run = orig
    cot, plain = captured["h"]
    torch.testing.assert_close(cot[1], plain[1], atol=1e-4, rtol=0)
    assert not torch.allclose(cot[0], plain[0], atol=1e-4)


def test_an_empty_negative_prompt_reasons_and_draws(tiny_pipeline):
    """The unconditional row then holds nothing before the image prefix, as in a plain run."""
    out = tiny_pipeline.run(Request(["a red cube"], 32, 32, negative="", seed=11, sampling=QUICK,
                                    reasoning=ReasoningSettings(mode="think", max_tokens=3)))
    assert out.tokens.shape == (1, 4, 64) and torch.isfinite(out.tokens).all()


def test_refine_mode_uses_the_prompt_refinement_span(tiny_pipeline):
    out = tiny_pipeline.run(req(ReasoningSettings(mode="refine", text="a glossy red cube")))
    assert "<|begin_of_prompt_refinement|>a glossy red cube<|end_of_prompt_refinement|>" in out.rows.texts[0]


def test_bad_reasoning_settings(tiny_pipeline):
    with pytest.raises(SettingsError, match="self_cot mode"):
        tiny_pipeline.run(req(ReasoningSettings(mode="dream")))
    with pytest.raises(SettingsError, match="max tokens"):
        tiny_pipeline.run(req(ReasoningSettings(mode="think", max_tokens=0)))


def test_reasoning_reports_each_text_token_and_can_be_cancelled(tiny_pipeline):
    from nextstep_core.errors import Cancelled
    seen = []

    def on_text(done, limit):
        seen.append((done, limit))
        if done == 2:
            raise Cancelled("stop")

    bb, tok = tiny_pipeline.backbone, tiny_pipeline.tokenizer
    old = bb.lm_head
    try:
        bb.lm_head = _Fixed(bb.cfg.vocab_size, tok.encode("a")[0])
        with pytest.raises(Cancelled):
            tiny_pipeline.run(req(ReasoningSettings(mode="think", max_tokens=5)), text_callback=on_text)
    finally:
        bb.lm_head = old
    assert seen == [(1, 5), (2, 5)]

