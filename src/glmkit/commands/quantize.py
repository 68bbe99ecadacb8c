"""`glmkit quantize`: write an int8/int4 copy of a model directory (or GGUF) that later loads without
quantizing again: `glmkit quantize --model DIR --quantization int4 --output DIR-int4`."""

from __future__ import annotations

import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    p.add_argument("--quantization", required=True, choices=("int8", "int4"))
    p.add_argument("--group-size", type=int, default=None, help="int4 group size along the input (default 32)")
    p.add_argument("--output", required=True, help="new directory for the quantized copy")


def main(args) -> int:
    from ..errors import InvalidParameterError
    from ..llm import resolve_model_dir
    from ..models.export import save_quantized
    from ..models.quant import DEFAULT_GROUP_SIZE, QuantPlan, bits_of

    bits = bits_of(args.quantization)
    group = args.group_size or DEFAULT_GROUP_SIZE
    if group not in (32, 64, 128, 256):
        raise InvalidParameterError("--group-size", group, "must be 32, 64, 128 or 256")
    start = time.perf_counter()
    out = save_quantized(resolve_model_dir(args.model), QuantPlan.fresh(bits, group), Path(args.output))
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out} ({args.quantization}, {size:.0f} MiB) in {time.perf_counter() - start:.1f} s; "
          f"load it with --model {out}")
    return 0
