"""The int8 products of one decode step of the default model's shape, kernel by kernel, on this CPU.

    python benchmarks/cpu_int8.py [--threads 2] [--rows 1 8 64] [--repeats 7] [--layers 24]

Every linear of a Qwen2.5-0.5B-shaped model (24 layers of qkv 1152x896, o 896x896, gate_up 9728x896,
down 896x4864, and the 151,936x896 head: 494 MB of int8 weights, far past any L3) multiplied once by `rows` input
rows, as in one engine step with that many sequences. Kernels:
- glmkit/<isa>: glmkit's own kernel (kernels/cpu_int8.c) on each instruction set this CPU runs;
- fbgemm: PyTorch's dynamic quantized linear, as glmkit's fallback calls it (two 7-bit passes without VNNI);
- w8a16: PyTorch's `_weight_int8pack_mm` with bf16 activations (the int8 mode).
Prints the median time of a step, the weight bytes read per second, and each kernel's ratio to fbgemm and to
w8a16 measured in the same run (interleaved, so noise hits all alike).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glmkit.models import cpu_int8
from glmkit.models.cpu_int8 import DynamicInt8Linear

SHAPES = {"qkv": (1152, 896), "o": (896, 896), "gate_up": (9728, 896), "down": (896, 4864)}
HEAD = (151936, 896)


def weights(layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = [shape for _ in range(layers) for shape in SHAPES.values()] + [HEAD]
    return [(torch.randint(-127, 128, shape, dtype=torch.int8, generator=g), torch.rand(shape[0]) / 100 + 1e-3)
            for shape in shapes]


def w8a16(qweight: torch.Tensor, scales: torch.Tensor):
    scales = scales.bfloat16()
    return lambda x: torch._weight_int8pack_mm(x, qweight, scales)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ws = weights(args.layers)
    total = sum(q.numel() for q, _ in ws)
    kernels: dict[str, list] = {}
    for isa in cpu_int8.own_kernel_isas():
        kernels[f"glmkit/{isa}"] = [DynamicInt8Linear(q, s, kernel="glmkit", isa=isa) for q, s in ws]
    if cpu_int8.fbgemm_available():
        kernels["fbgemm"] = [DynamicInt8Linear(q, s, kernel="fbgemm") for q, s in ws]
    kernels["w8a16"] = [w8a16(q, s) for q, s in ws]
    print(f"{total / 1e6:.0f} MB of int8 weights, {args.threads} threads, median of {args.repeats}; "
          f"glmkit's kernel here: {', '.join(cpu_int8.own_kernel_isas()) or 'not built'}")
    for rows in args.rows:
        xs = {k: torch.randn(rows, k).bfloat16() for k in {q.shape[1] for q, _ in ws}}
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, linears in kernels.items():
                start = time.perf_counter()
                for (q, _), linear in zip(ws, linears):
                    linear(xs[q.shape[1]])
                if repeat:
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        print(f"\nrows {rows}:\n| kernel | ms/step | GB/s of weights | x fbgemm | x w8a16 |\n|---|---|---|---|---|")
        for name, t in medians.items():
            vs_fbgemm = f"{medians['fbgemm'] / t:.2f}" if "fbgemm" in medians else "-"
            print(f"| {name} | {t * 1e3:.1f} | {total / t / 1e9:.1f} | {vs_fbgemm} | {medians['w8a16'] / t:.2f} |")


if __name__ == "__main__":
    main()
