"""ChatGLM2-6B, ChatGLM3-6B (-32k/-128k), CharacterGLM-6B and GLM-4-9B-chat: the original layout
(`model_type: chatglm`, `transformer.encoder.layers.N...`) and the transformers-native `-hf` layout
(`model_type: glm`).

Both reduce to the shared decoder with rotary on the first half of each head, interleaved pairs, base
10000 * rope_ratio, and a fused [q | k | v] projection with bias. Only names and config keys live here.
"""

from __future__ import annotations

import re

from .config import ModelConfig


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def config_from_chatglm(cfg: dict) -> ModelConfig:
    heads, head_dim = cfg["num_attention_heads"], cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention") else heads
    return ModelConfig(
        family="glm", model_type="chatglm", name=cfg.get("_name_or_path", ""),
        vocab_size=cfg.get("padded_vocab_size") or cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_layers"], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=cfg["ffn_hidden_size"], rms_norm_eps=cfg.get("layernorm_epsilon", 1e-5),
        rope_theta=10000.0 * cfg.get("rope_ratio", 1), rotary_dim=head_dim // 2, rope_interleaved=True,
        qkv_bias=cfg.get("add_qkv_bias", False), tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("seq_length", 8192), eos_token_ids=_eos_list(cfg.get("eos_token_id")),
    )


def config_from_glm_hf(cfg: dict) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)
    factor = cfg.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
    return ModelConfig(
        family="glm", model_type="glm", name=cfg.get("_name_or_path", ""),
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads), head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1.5625e-07),
        rope_theta=float(theta), rotary_dim=int(head_dim * factor), rope_interleaved=True,
        qkv_bias=cfg.get("attention_bias", True), tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 131072),
        eos_token_ids=_eos_list(cfg.get("eos_token_id")),
    )


_CHATGLM_NAMES = [
    (r"transformer\.embedding\.word_embeddings\.weight", "embed.weight"),
    (r"transformer\.encoder\.final_layernorm\.weight", "norm.weight"),
    (r"transformer\.output_layer\.weight", "lm_head.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.weight", r"layers.\1.attn.o.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight", r"layers.\1.mlp.gate_up.weight"),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight", r"layers.\1.mlp.down.weight"),
]
# Saved buffers / P-Tuning prefixes that are not weights of the decoder.
_CHATGLM_SKIP = re.compile(r"transformer\.rotary_pos_emb\.inv_freq")

_GLM_HF_NAMES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", r"layers.\1.attn.qkv.\3#\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attn.o.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", r"layers.\1.mlp.gate_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.mlp.down.weight"),
]
_GLM_HF_SKIP = re.compile(r"model\.rotary_emb\..*|.*\.rotary_emb\.inv_freq")
