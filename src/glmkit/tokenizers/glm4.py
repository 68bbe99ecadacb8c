"""GLM-4 tokenizer: a tiktoken BPE from the checkpoint's `tokenizer.model` ranks file plus 14 special ids.

The ranks file has one `<base64 token> <rank>` line per token; special ids follow the last rank in a fixed
order. Knows nothing of chat formats.
"""

from __future__ import annotations

import base64
from pathlib import Path

import tiktoken

from .base import Tokenizer, clean_text

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>"]
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def read_ranks(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class GLM4Tokenizer(Tokenizer):
    def __init__(self, ranks_file: str | Path):
        ranks = read_ranks(ranks_file)
        start = len(ranks)
        self.special_tokens = {tok: start + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="glm4", pat_str=PATTERN, mergeable_ranks=ranks,
                                     special_tokens=self.special_tokens)
        self.num_ranks = start
        self._bytes = [b""] * start
        for token, rank in ranks.items():
            self._bytes[rank] = token
        self.vocab_size = start + len(SPECIAL_TOKENS)
        self.eos_token_id = self.special_tokens["<|endoftext|>"]
        self.pad_token_id = self.eos_token_id

    def encode(self, text: str) -> list[int]:
        # disallowed_special=() encodes special-token strings found in text as ordinary text.
        return self.enc.encode(clean_text(text), disallowed_special=())

    def token_bytes(self) -> list[bytes | None]:
        return list(self._bytes) + [tok.encode("utf-8") for tok in SPECIAL_TOKENS]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if 0 <= i < self.num_ranks]
        else:
            ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self.enc.decode(ids)
