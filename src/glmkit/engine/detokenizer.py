"""Incremental detokenizer: turns a growing list of ids into text deltas that never end inside a multi-byte
character. Each step decodes only a window that starts at the previous delta's tokens (their text gives the
new tokens their context: leading spaces, merged bytes), so a long output costs O(1) per token. Knows only
the Tokenizer interface."""

from __future__ import annotations

from ..tokenizers.base import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0   # window start: the tokens of the previous delta
        self.read_offset = 0     # tokens before this are already in the emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Append ids; return the new text. An incomplete character is held back unless final."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if not final and (len(text) <= len(prefix) or text.endswith("\ufffd")):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]
