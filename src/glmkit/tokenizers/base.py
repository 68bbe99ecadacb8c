"""The one interface every tokenizer offers to chat renderers, the engine and the detokenizer.

`encode` turns plain text into ids and never produces a special id, whatever the text contains: user text
that spells "<|user|>" stays text (prompt-injection safe). Special tokens are looked up by name with
`special_id`, and renderers place them explicitly.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Lone UTF-16 surrogates (valid in JSON, invalid in UTF-8) become U+FFFD; pairs become their character."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer(ABC):
    vocab_size: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    # special token string -> id (e.g. "<|user|>" -> 64795)
    special_tokens: dict[str, int]

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids. Never yields special ids and adds no prefix tokens."""

    @abstractmethod
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text. With skip_special_tokens=False, special ids appear as their literal strings."""

    @abstractmethod
    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id adds to generated text, by id (None for ids with no text: control ids, gaps).
        Special ids are listed too but callers look them up in `special_tokens` (constrained decoding)."""

    def special_id(self, token: str) -> int:
        try:
            return self.special_tokens[token]
        except KeyError:
            raise KeyError(f"tokenizer has no special token {token!r}; it has {sorted(self.special_tokens)}")

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Text in which special-token strings ARE special (rendered chat templates only, never user text)."""
        if not self.special_tokens:
            return self.encode(text)
        import re

        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for i, part in enumerate(re.split(pattern, text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode(part))
        return ids
