"""GGUF file -> a cached Hugging Face-style directory (config.json, model.safetensors in fp32, tokenizer.json,
tokenizer_config.json with the chat template), converted once with a progress bar and reused afterwards.

Supports the `qwen2` and `llama` architectures and every quant type the `gguf` package can dequantize
(F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K ...). Knows nothing of generation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ModelLoadError
from ..tokenizers.gguf_vocab import TOKEN_TYPE_CONTROL, build_bpe_tokenizer, write_tokenizer_json

SUPPORTED_ARCHS = ("qwen2", "llama")
CONVERTED_MARKER = ".glmkit-converted"
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def cache_root() -> Path:
    return Path(os.environ.get("GLMKIT_CACHE") or Path.home() / ".cache" / "glmkit")


def converted_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "converted" / f"{gguf_path.stem}-{key}"


def build_once(out: Path, build: Callable[[Path], None], done: str) -> Path:
    """`out`, built by `build(tmp)` in a scratch directory that is renamed into place when complete, unless
    `out/done` shows an earlier build finished. An interrupted build leaves nothing half-written behind."""
    if (out / done).is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_converted(gguf_path: Path) -> Path:
    """Return the converted directory for a GGUF file, converting it on first use."""
    def build(tmp: Path) -> None:
        convert(gguf_path, tmp)
        (tmp / CONVERTED_MARKER).write_text(str(gguf_path.resolve()))

    return build_once(converted_dir(gguf_path), build, CONVERTED_MARKER)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for the llama architecture (interleaved -> NeoX halves)."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(gguf_path: Path, out: Path) -> None:
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm import tqdm

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path} ({type(e).__name__}: {e}); it is probably "
                             "truncated or not a GGUF file")
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}")
    config = _hf_config(reader, arch)
    state = {}
    for t in tqdm(reader.tensors, desc=f"converting {gguf_path.name} (once)", unit="tensor"):
        name = _hf_name(t.name)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, config["num_attention_heads"])
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, config["num_key_value_heads"])
        state[name] = torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else w.copy())
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(reader, out)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ModelLoadError(f"GGUF tensor {name!r} is not part of a supported qwen2/llama model")


def _hf_config(reader, arch: str) -> dict:
    def key(k, default=None):
        return _field(reader, f"{arch}.{k}", default)

    heads, hidden = key("attention.head_count"), key("embedding_length")
    return {
        "model_type": arch, "_name_or_path": _field(reader, "general.name", ""),
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data), "hidden_size": hidden,
        "num_hidden_layers": key("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length", hidden // heads), "intermediate_size": key("feed_forward_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096), "attention_bias": arch == "qwen2",
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def _write_tokenizer(reader, out: Path) -> None:
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE 'gpt2'); "
                             "use the model's Hugging Face directory with tokenizer.json instead")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = _field(reader, "tokenizer.ggml.merges") or []
    tok = build_bpe_tokenizer(tokens, types, merges, _field(reader, "tokenizer.ggml.pre", "default"))
    write_tokenizer_json(tok, out / "tokenizer.json", {i for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL})
    tok_config = {}
    for name in ("bos", "eos", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            tok_config["pad_token" if name == "padding" else f"{name}_token"] = tokens[token_id]
    tok_config["add_bos_token"] = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False, indent=2))
