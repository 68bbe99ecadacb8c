"""peft's prefix tuning (`PrefixTuningConfig`, `peft_type: PREFIX_TUNING`) read for serving.

peft saves `prompt_embeddings` [num_virtual_tokens, num_layers * 2 * token_dim]: the keys and values of every
layer, already through the projection when `prefix_projection` was on. Viewed as [tokens, layers * 2, heads,
head_dim], row 2i is layer i's keys and row 2i + 1 its values; for grouped-query models peft sizes them by the
KV heads (token_dim = KV heads x head dim). transformers counts them as past tokens, so the real tokens' rotary
positions start at num_virtual_tokens (PrefixAdapter.after_prefix); the keys themselves are never rotated.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelLoadError
from .lora import ADAPTER_CONFIG, read_adapter_weights
from .ptuning import PrefixAdapter

KEY = "prompt_embeddings"


def is_peft_prefix_dir(directory: Path) -> bool:
    try:
        raw = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("peft_type") == "PREFIX_TUNING"


def read_peft_prefix(directory: str | Path, config) -> PrefixAdapter:
    """A peft prefix-tuning directory -> the prefix's keys and values for a model of `config`."""
    path = Path(directory).expanduser()
    raw = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))  # is_peft_prefix_dir has read it
    tokens, layers, heads = raw.get("num_virtual_tokens"), raw.get("num_layers"), raw.get("num_attention_heads")
    width = raw.get("token_dim")
    if raw.get("num_transformer_submodules", 1) != 1:
        raise ModelLoadError(f"{path}: a prefix for an encoder-decoder model (num_transformer_submodules="
                             f"{raw.get('num_transformer_submodules')}); glmkit serves decoder-only models")
    want = (config.num_layers, config.num_kv_heads, config.num_kv_heads * config.head_dim)
    if (layers, heads, width) != want:
        raise ModelLoadError(
            f"{path}: its prefix has {layers} layers of {heads} key/value heads ({width} values per token) but this "
            f"model's keys are {want[0]} layers of {want[1]} heads ({want[2]}); it was made for another model"
            + (" (peft sizes a prefix by the attention heads where a model's config does not name its grouped KV "
               "heads, as ChatGLM's does not)" if heads == config.num_heads != config.num_kv_heads else ""))
    file, state = read_adapter_weights(path)
    table = state.get(KEY) if isinstance(state, dict) else None
    if table is None or tuple(table.shape) != (tokens, layers * 2 * width):
        got = "none" if table is None else tuple(table.shape)
        raise ModelLoadError(f"{file}: expected {KEY} of shape ({tokens}, {layers * 2 * width}), found {got}")
    kv = table.float().view(tokens, layers * 2, heads, width // heads)
    return PrefixAdapter(path, tokens, [(kv[:, 2 * i].clone(), kv[:, 2 * i + 1].clone()) for i in range(layers)],
                         after_prefix=True)
