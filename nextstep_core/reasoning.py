"""Self-CoT: the model writes text in a thinking span before it draws.

StepFun published no recipe, only the span tokens. Ours: after the caption the conditional rows
open `<|begin_of_thinking|>` (or `<|begin_of_prompt_refinement|>` in refine mode) and the LM head
writes until the span's end token or the token limit (then we close it). Only the conditional
rows reason: the unconditional rows keep exactly their plain-run content, so CFG pushes toward
"caption + reasoning" and away from the negative prompt. The image then continues on the same
KV cache: nothing is prefilled twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import Backbone
from .errors import SettingsError
from .kv_cache import StaticKVCache
from .tokenizer import BOPR, BOT, EOPR, EOT, NextStepTokenizer

MODES = ("off", "think", "refine")


@dataclass(frozen=True)
class ReasoningSettings:
    mode: str = "off"            # off | think | refine
    max_tokens: int = 256
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 0.9
    text: str | None = None      # the user's own reasoning: no generation, reproducible

    def span(self, tok: NextStepTokenizer) -> tuple[str, str]:
        return (BOT, EOT) if self.mode == "think" else (BOPR, EOPR)

    def check(self) -> None:
        if self.mode not in MODES:
            raise SettingsError(f"Unknown self_cot mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if self.mode != "off" and self.text is None and self.max_tokens < 1:
            raise SettingsError(f"Self-CoT max tokens = {self.max_tokens}; use at least 1 (256 is a good start).")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise SettingsError(f"temperature={self.temperature} / top_p={self.top_p}: use temperature >= 0 and "
                                "0 < top_p <= 1.")


def forced_suffix(settings: ReasoningSettings, tok: NextStepTokenizer) -> str:
    """The text a user-supplied reasoning adds after the caption: open, text, close."""
    open_, close = settings.span(tok)
    return f"{open_}{settings.text}{close}"


def _pick(logits: torch.Tensor, s: ReasoningSettings, gen: torch.Generator) -> torch.Tensor:
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / s.temperature, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < s.top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return order.gather(-1, choice).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate_reasoning(bb: Backbone, tok: NextStepTokenizer, cache: StaticKVCache, hidden: torch.Tensor,
                       s: ReasoningSettings, gen: torch.Generator, kv_exact: bool = False,
                       on_token=None) -> list[list[int]]:
    """Write the span on `cache` (the conditional rows only), starting from `hidden` [rows, H], the
    state after the span's opening token. Every row ends with the closing token in the cache;
    rows that close early get masked slots while the others go on. Returns each row's text ids.
    `on_token(i, max_tokens)` runs after every text token (progress, Cancel)."""
    close_id = tok.id_of(s.span(tok)[1])
    rows = hidden.shape[0]
    dev = hidden.device
    done = torch.zeros(rows, dtype=torch.bool, device=dev)
    out: list[list[int]] = [[] for _ in range(rows)]
    for i in range(s.max_tokens + 1):
        if i == s.max_tokens:  # the limit: close every open span ourselves
            nxt = torch.full((rows,), close_id, dtype=torch.long, device=dev)
        else:
            nxt = _pick(bb.logits(hidden), s, gen)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
        active = ~done
        ids = nxt.tolist()  # the one host read per token that stopping needs
        for r, t in enumerate(ids):
            if not done[r] and t != close_id:
                out[r].append(t)
        hidden = bb.step(bb.embed(nxt[:, None]), cache, None if kv_exact else cache.length + 1, valid=active)[:, -1]
        done = done | (nxt == close_id)
        if on_token is not None:
            on_token(i + 1, s.max_tokens)
        if bool(done.all()):
            break
    return out
