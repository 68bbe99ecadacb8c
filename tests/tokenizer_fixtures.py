"""Tiny tokenizers trained in seconds, in the formats real checkpoints ship: a ChatGLM SentencePiece model,
a GLM-4 tiktoken ranks file and a Qwen-style tokenizer.json (+ tokenizer_config.json with a chat template)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

CORPUS = [
    "你好，我是人工智能助手。很高兴见到你！", "晚上睡不着应该怎么办", "今天天气怎么样？北京晴，气温 22 度。",
    "[Round 1]\n\n问：你好\n\n答：你好！", "Hello, how are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n", "print('hello world')", "```python\ntool_call(location=\"beijing\")\n```",
    "The quick brown fox jumps over the lazy dog. 12345 67890", "以下是一段对话。关于小明的信息：喜欢读书。",
    '{"name": "get_weather", "arguments": {"city": "上海"}}', "Answer the following questions as best as you can.",
    "你是一个名为 ChatGLM 的人工智能助手。", "请用 Java 写一个快速排序。", "system user assistant observation",
]


def train_sentencepiece(out: Path) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2,
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def _train_byte_bpe(vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def write_glm4_ranks(out: Path) -> Path:
    """A tiktoken ranks file: rank = the BPE trainer's id, so ranks follow merge order as tiktoken needs."""
    tok = _train_byte_bpe(600, [])
    decode = _byte_decoder()
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(bytes(decode[c] for c in piece)).decode()} {rank}" for rank, (piece, _) in
             enumerate(vocab)]
    path = out / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    return path


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_hf_tokenizer(out: Path, chat_template: str = QWEN_TEMPLATE) -> Path:
    tok = _train_byte_bpe(600, QWEN_SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": chat_template,
    }))
    return out / "tokenizer.json"
