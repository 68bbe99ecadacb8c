"""Llama and Qwen2 checkpoints in the Hugging Face layout (`model_type: llama | qwen2`): NeoX-style rotary
over the whole head, separate q/k/v (Qwen2: with bias) and gate/up projections, optionally tied embeddings.

Only names and config keys live here; separate projections are fused at load time (`#q`, `#gate` parts).
"""

from __future__ import annotations

import re

from .config import ModelConfig
from .glm import _eos_list


def config_from_llama(cfg: dict) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        from ..errors import ModelLoadError
        raise ModelLoadError(f"rope_scaling={scaling!r} is not supported yet; supported: none/default")
    model_type = cfg.get("model_type", "llama")
    return ModelConfig(
        family="llama", model_type=model_type, name=cfg.get("_name_or_path", ""),
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads), head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)), rotary_dim=head_dim,
        rope_interleaved=False, qkv_bias=cfg.get("attention_bias", model_type == "qwen2"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        eos_token_ids=_eos_list(cfg.get("eos_token_id")),
    )


_LLAMA_NAMES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", r"layers.\1.attn.qkv.\3#\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attn.o.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight", r"layers.\1.mlp.gate_up.weight#\2"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.mlp.down.weight"),
]
_LLAMA_SKIP = re.compile(r".*\.rotary_emb\.inv_freq")
