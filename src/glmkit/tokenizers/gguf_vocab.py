"""Build a `tokenizer.json` from the vocabulary stored in a GGUF file (byte-level BPE, `tokenizer.ggml.model`
"gpt2"), so GGUF models tokenize exactly like their original Hugging Face tokenizer.

Knows the pre-tokenizer regexes by the GGUF `tokenizer.ggml.pre` name; nothing about models or chat formats.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import ModelLoadError

PRE_TOKENIZER_PATTERNS = {
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+",
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
}
PRE_TOKENIZER_PATTERNS["default"] = PRE_TOKENIZER_PATTERNS["gpt-2"]
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def build_bpe_tokenizer(tokens: list[str], token_types: list[int], merges: list[str], pre: str) -> Tokenizer:
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise ModelLoadError(
            f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: {sorted(PRE_TOKENIZER_PATTERNS)}. "
            "Use the model's Hugging Face directory (with tokenizer.json) instead")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERNS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    added = []
    for i, (text, kind) in enumerate(zip(tokens, token_types)):
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED):
            added.append((i, AddedToken(text, special=kind == TOKEN_TYPE_CONTROL, normalized=False)))
    # add_tokens keeps existing vocab ids for tokens already in the BPE vocabulary.
    tok.add_tokens([a for _, a in added])
    for i, a in added:
        if tok.token_to_id(a.content) != i:
            raise ModelLoadError(f"GGUF vocabulary: added token {a.content!r} has id {i} but maps to "
                                 f"{tok.token_to_id(a.content)}; the file's vocabulary is inconsistent")
    return tok


def write_tokenizer_json(tok: Tokenizer, path: Path, special_ids: set[int]) -> None:
    """Save, marking control tokens as special (tokenizers' `add_tokens` stores them as non-special)."""
    import json

    tok.save(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    for entry in data.get("added_tokens", []):
        entry["special"] = entry["id"] in special_ids
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
