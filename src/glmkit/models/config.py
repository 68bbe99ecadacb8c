"""ModelConfig: the architecture numbers every family is reduced to, read from a checkpoint's config.json.

Each family module turns its own config.json keys into this one shape; the shared decoder only reads this.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    family: str                 # "glm" (ChatGLM2/3, GLM-4, -hf) or "llama" (Llama, Qwen2)
    model_type: str             # as written in config.json
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int             # leading dims of each head that are rotated
    rope_interleaved: bool      # GPT-J pairs (2i, 2i+1) as in ChatGLM, else NeoX halves as in Llama
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
