"""`glmkit merge`: fold a LoRA adapter into its base model's weights and save the result as a plain model
directory (same tensor names and layout as the base), which needs no adapter to load:

    glmkit merge --model /models/chatglm3-6b --adapter out/ --output chatglm3-6b-merged/
"""

from __future__ import annotations

import time
from pathlib import Path

from .args import existing_path


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="the base model directory or .gguf (default: the embedded model)",
                   type=existing_path("--model", "pass the model the adapter was trained on"))
    p.add_argument("--adapter", required=True, help="the LoRA adapter directory (glmkit finetune's or peft's)",
                   type=existing_path("--adapter", "pass the directory a LoRA fine-tuning saved"))
    p.add_argument("--output", required=True, help="new directory for the merged model")


def main(args) -> int:
    from ..llm import resolve_model_dir
    from ..models import default
    from ..models.lora import merge_into, read_adapter

    start = time.perf_counter()
    adapter = read_adapter(args.adapter)
    model_dir = default.ensure_float_dir() if args.model is None else resolve_model_dir(args.model)
    out = merge_into(model_dir, adapter, Path(args.output).expanduser())
    print(f"merged {len(adapter.weights)} adapted modules into {out} in {time.perf_counter() - start:.0f} s; "
          f"load it with --model {out}")
    return 0
