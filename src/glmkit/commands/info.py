"""`glmkit info`: resolve and load a model, then print what glmkit will use for it."""

from __future__ import annotations

from .args import add_model_arguments, load_llm


def add_arguments(p) -> None:
    add_model_arguments(p)


def main(args) -> int:
    llm = load_llm(args)
    c = llm.model_config
    print(f"model directory : {llm.model_dir}")
    print(f"name            : {c.name or '-'} ({c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_heads} heads / {c.num_kv_heads} kv heads)")
    print(f"chat format     : {llm.chat_format.name} (stop ids {llm.chat_format.stop_token_ids})")
    quant = llm.quantization
    print(f"device / dtype  : {llm.device} / {llm.dtype}; quantization "
          + (f"{quant.mode} ({quant.source})" if quant else "none"))
    print(f"context         : {llm.engine.max_model_len} tokens; KV cache {llm.engine.blocks.num_blocks} blocks "
          f"of {llm.engine.blocks.block_size}")
    if args.model is None:
        from ..models import default

        print(f"default model   : {default.NAME}; licence: {default.LICENSE}")
    return 0
