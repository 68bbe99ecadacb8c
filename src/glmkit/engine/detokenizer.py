"""Incremental detokenizer: turns a growing list of ids into text deltas that never end inside a multi-byte
character, so the concatenation of deltas equals the decode of all ids. Knows only the Tokenizer interface."""

from __future__ import annotations

from ..tokenizers.base import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""          # text emitted so far

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Append ids; return the new stable text (an incomplete character is held back unless final)."""
        self.ids.extend(new_ids)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if not final and full.endswith("\ufffd"):
            return ""
        if not full.startswith(self.text):
            # Decoding can rewrite a held-back tail (rare with byte-level BPE); emit from the common prefix.
            common = 0
            while common < min(len(full), len(self.text)) and full[common] == self.text[common]:
                common += 1
            self.text = self.text[:common]
        delta = full[len(self.text):]
        self.text = full
        return delta
