"""NextStep's tokenizer: the Qwen2 byte-level BPE plus its added image/thinking tokens.

Uses the `tokenizers` library directly on `tokenizer.json` (no transformers, no remote code);
that alone reproduces the official input ids, special tokens inside text included. Every
special id is looked up by its text, never hard-coded.
"""
from __future__ import annotations

import os

from .config import read_json
from .errors import CheckpointError

IMAGE_AREA = "<|image_area|>"
BOI = "<|begin_of_image|>"
EOI = "<|end_of_image|>"
PLACEHOLDER = "<|image_placeholder|>"
BOPR = "<|begin_of_prompt_refinement|>"
EOPR = "<|end_of_prompt_refinement|>"
BOT = "<|begin_of_thinking|>"
EOT = "<|end_of_thinking|>"
PAD = "[PAD]"
REQUIRED = (IMAGE_AREA, BOI, EOI, PLACEHOLDER)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _token_text(entry):
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


class NextStepTokenizer:
    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            present = [f for f in ("vocab.json", "merges.txt") if os.path.isfile(os.path.join(folder, f))]
            hint = (" Only vocab.json/merges.txt are there; " if present else " ")
            raise CheckpointError(
                f"No tokenizer.json in {folder}.{hint}Download the tokenizer files of the Hugging Face repo "
                "(tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, special_tokens_map.json) into "
                "the model folder.")
        from tokenizers import Tokenizer
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as exc:  # the library raises plain Exceptions for corrupt JSON
            raise CheckpointError(f"{path} could not be read ({exc}); download it again.") from None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        pad = _token_text(cfg.get("pad_token")) or PAD
        missing = [t for t in REQUIRED + (pad,) if self.tok.token_to_id(t) is None]
        if missing:
            raise CheckpointError(
                f"The tokenizer in {folder} lacks NextStep's tokens {missing}: it looks like a plain Qwen2 "
                "tokenizer. Use the tokenizer files shipped with the NextStep model repo.")
        self.ids = {name: self.tok.token_to_id(name) for name in
                    (IMAGE_AREA, BOI, EOI, PLACEHOLDER, BOPR, EOPR, BOT, EOT, pad)}
        self.pad_id = self.ids[pad]
        self.boi_id, self.eoi_id, self.placeholder_id = self.ids[BOI], self.ids[EOI], self.ids[PLACEHOLDER]

    def id_of(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Ids as the official `tokenizer(text, add_special_tokens=True)`; a BOS (none for Qwen2
        tokenizers) is dropped to match the official prefix handling."""
        ids = self.tok.encode(text, add_special_tokens=True).ids
        if self.bos_token is not None and ids and ids[0] == self.tok.token_to_id(self.bos_token):
            ids = ids[1:]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)
