"""Tokenizers from a `tokenizer.json` (Qwen, Llama-3, GLM-4 -hf ...) through the `tokenizers` library.

Special (added) tokens found in plain text are encoded as text (`encode_special_tokens`), so user content
can never forge a role token; rendered chat templates go through `encode_with_special_tokens`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .base import Tokenizer, clean_text


def _token_text(value):
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer(Tokenizer):
    def __init__(self, tokenizer_json: str | Path, tokenizer_config: dict | None = None):
        self.tok = _HFTokenizer.from_file(str(tokenizer_json))
        self.tok.encode_special_tokens = True
        data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        self.special_tokens = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        config = tokenizer_config or {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = config.get("chat_template")
        self.add_bos_token = bool(config.get("add_bos_token", False))  # for raw (non-chat) prompts

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(clean_text(text), add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
