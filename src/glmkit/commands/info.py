"""`glmkit info`: resolve and load a model, then print what glmkit will use for it.

The weights are loaded (that checks them against config.json) but the KV pool is a 1 MiB probe: the context
and the pool a real start would allocate are computed from the bytes per token, not reserved just to print.
"""

from __future__ import annotations

import logging

from .args import add_model_arguments, load_llm

PROBE_POOL_GIB = 2**-10  # one block for any model: enough to build an engine, nothing to wait for
SERVE_MAX_NUM_SEQS = 64  # glmkit serve's default, for the pool's size


def add_arguments(p) -> None:
    add_model_arguments(p)


def _binary_size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 / 10 else f"{size / 2**20:.3g} MiB"


def _kv_lines(llm, args) -> list[str]:
    from ..engine.runner import kv_bytes_per_token
    from ..llm import default_kv_budget, kv_cache_blocks

    per_token = kv_bytes_per_token(llm.model, llm.dtype)
    block_size = llm.config.block_size
    allowed = args.max_model_len or llm.model_config.max_position_embeddings
    if args.kv_cache_memory is not None:
        budget, source = int(args.kv_cache_memory * 2**30), "--kv-cache-memory"
    else:
        budget, source = default_kv_budget(llm.device), f"the default on {llm.device.type}"
    num_blocks = kv_cache_blocks(budget, per_token, block_size, allowed, SERVE_MAX_NUM_SEQS)
    capacity = num_blocks * block_size
    context = min(allowed, capacity)
    limit = "" if context == allowed else f" (the model allows {allowed}; raise --kv-cache-memory for more)"
    return [f"context         : {context} tokens{limit}",
            f"KV cache        : {per_token} bytes per token; a {_binary_size(budget)} pool ({source}) holds "
            f"{capacity} tokens in {num_blocks} blocks of {block_size}"]


def main(args) -> int:
    if not args.verbose:  # the start-up log describes the probe's tiny pool, not the real one printed below
        logging.getLogger("glmkit").setLevel(logging.WARNING)
        logging.getLogger("glmkit.steps").setLevel(logging.INFO)  # a first start's conversion steps still show
    llm = load_llm(args, kv_cache_memory_gb=PROBE_POOL_GIB, max_model_len=None, max_num_seqs=1, enforce_eager=True)
    c = llm.model_config
    print(f"model directory : {llm.model_dir}")
    print(f"name            : {c.name or '-'} ({c.model_type}, {c.num_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_heads} heads / {c.num_kv_heads} kv heads)")
    print(f"chat format     : {llm.chat_format.name} (stop ids {llm.chat_format.stop_token_ids})")
    quant = llm.quantization
    print(f"device / dtype  : {llm.device} / {llm.dtype}; quantization "
          + (f"{quant.mode} ({quant.source})" if quant else "none"))
    for line in _kv_lines(llm, args):
        print(line)
    if args.model is None:
        from ..models import default

        print(f"default model   : {default.NAME}; licence: {default.LICENSE}")
    return 0
