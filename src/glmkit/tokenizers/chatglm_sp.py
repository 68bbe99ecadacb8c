"""ChatGLM2/ChatGLM3/CharacterGLM tokenizer: SentencePiece plus virtual special ids.

The special tokens are not in the SentencePiece model; they get ids right after its vocabulary, in the order
[MASK], [gMASK], [sMASK], sop, eop, <|system|>, <|user|>, <|assistant|>, <|observation|> (ChatGLM2 uses only
the first five; the extra four ids are harmless there). Knows nothing of chat formats.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .base import Tokenizer, clean_text

SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>"]


class ChatGLMSPTokenizer(Tokenizer):
    def __init__(self, model_file: str | Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.num_sp_tokens = self.sp.vocab_size()
        self.special_tokens = {tok: self.num_sp_tokens + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {i: tok for tok, i in self.special_tokens.items()}
        self.vocab_size = self.num_sp_tokens + len(SPECIAL_TOKENS)
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.unk_id()
        # bos/eos/unk decode to "" like the original tokenizer does.
        self._control_ids = {self.bos_token_id, self.eos_token_id, self.pad_token_id}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(clean_text(text))

    def token_bytes(self) -> list[bytes | None]:
        out: list[bytes | None] = []
        for i in range(self.num_sp_tokens):
            if self.sp.is_byte(i):  # <0x0A> and the like: byte fallback
                out.append(bytes([int(self.sp.id_to_piece(i)[3:5], 16)]))
            elif self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i):
                out.append(None)
            else:
                out.append(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out + [tok.encode("utf-8") for tok in SPECIAL_TOKENS]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text, run = [], []
        for i in ids:
            if i in self._id_to_special:
                if not skip_special_tokens:
                    text.append(self.sp.decode(run))
                    text.append(self._id_to_special[i])
                    run = []
            elif i in self._control_ids or i >= self.vocab_size or i < 0:
                continue
            else:
                run.append(i)
        text.append(self.sp.decode(run))
        return "".join(text)
