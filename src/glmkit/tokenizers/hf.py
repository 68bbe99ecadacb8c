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
        self._json_path = Path(tokenizer_json)
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

    def token_bytes(self) -> list[bytes | None]:
        data = json.loads(self._json_path.read_text(encoding="utf-8"))
        vocab = data["model"].get("vocab") or {}
        pieces = vocab.items() if isinstance(vocab, dict) else ((p[0], i) for i, p in enumerate(vocab))  # Unigram
        kinds = _decoder_kinds(data.get("decoder"))
        out: list[bytes | None] = [None] * self.vocab_size
        to_byte = _unicode_to_byte() if "ByteLevel" in kinds else None
        for piece, i in pieces:
            if i < len(out):
                out[i] = _piece_bytes(piece, to_byte, "ByteFallback" in kinds)
        for added in data.get("added_tokens", []):  # added tokens are stored as their text
            if added["id"] < len(out):
                out[added["id"]] = added["content"].encode("utf-8")
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _decoder_kinds(decoder) -> set[str]:
    if not decoder:
        return set()
    return {decoder.get("type", "")} | {k for d in decoder.get("decoders") or [] for k in _decoder_kinds(d)}


def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE stores each byte as a printable character: bytes that are printable Latin-1 stand for
    themselves; the others are numbered from U+0100 upwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _piece_bytes(piece: str, to_byte: dict[str, int] | None, byte_fallback: bool) -> bytes:
    if to_byte is not None:
        try:
            return bytes(to_byte[c] for c in piece)
        except KeyError:
            return piece.encode("utf-8")
    if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")
