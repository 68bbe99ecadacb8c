"""`glmkit quantize`: write an int8/int4 copy of a model directory (or GGUF) that later loads without
quantizing again: `glmkit quantize --model DIR --quantization int4 --output DIR-int4`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .args import existing_path, one_of

GROUP_SIZES = ("32", "64", "128", "256")


def _output(text: str) -> str:
    """A new directory: checked now, not after minutes of converting and quantizing."""
    if (Path(text).expanduser() / "config.json").exists():
        raise argparse.ArgumentTypeError(f"--output={text!r}: already holds a model; choose a new directory")
    return text


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)",
                   type=existing_path("--model", "pass a local model directory or .gguf file"))
    p.add_argument("--quantization", required=True, type=one_of("--quantization", ("int8", "int4")),
                   help="int8 or int4")
    p.add_argument("--group-size", default=None, help="int4 group size along the input: 32 (default), 64, 128, 256",
                   type=lambda text: int(one_of("--group-size", GROUP_SIZES)(text)))
    p.add_argument("--output", required=True, type=_output, help="new directory for the quantized copy")


def main(args) -> int:
    from ..llm import resolve_model_dir
    from ..models.export import save_quantized
    from ..models.quant import DEFAULT_GROUP_SIZE, QuantPlan, bits_of

    bits = bits_of(args.quantization)
    group = args.group_size or DEFAULT_GROUP_SIZE
    start = time.perf_counter()
    out = save_quantized(resolve_model_dir(args.model), QuantPlan.fresh(bits, group), Path(args.output))
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"wrote {out} ({args.quantization}, {size:.0f} MiB) in {time.perf_counter() - start:.1f} s; "
          f"load it with --model {out}")
    return 0
