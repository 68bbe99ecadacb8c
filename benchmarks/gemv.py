"""Single-row products (batch-1 decode) on a GPU: glmkit's GEMV kernel against cuBLAS (torch's F.linear), per
linear layer of a model shape, in the same run.

    python benchmarks/gemv.py [--shape chatglm3-6b|glm4-9b] [--sweep] [--quant int8 int4] [--group-size 32]
        [--rows 256 512 2048]

Each product is timed inside a CUDA graph (as the decode step runs) over enough copies of the weight that L2
cannot hold them, median of 5 rounds. Prints microseconds and TB/s per layer, the ratio to cuBLAS, and the
weight-reading time of one token (layers x calls). --sweep also tries other tile configurations and prints the
best few per layer (what kernels/gemv.py's config() was chosen from).

--quant instead times the weight-only quantized product of one row (kernels/quant_matmul.py; random weights
quantized as `--quantization` does, int4 in groups of --group-size) against the bf16 GEMV in the same run, in
TB/s of the bytes it reads (weights and scales): how far a quantized decode step is from its bandwidth limit.
With --sweep it also times the tiled kernel and tile choices of the single-row one (QuantMatmul.gemv_config).

--quant with --rows times products of that many rows instead (decode batches, prompt chunks): bf16 cuBLAS, the
tiled quantized kernel and the dequantize-then-cuBLAS path (QuantMatmul._dequantized), each forced whatever
QuantMatmul.DEQUANT_ROWS would pick, with both quantized times as a fraction of bf16's speed (what DEQUANT_ROWS
was chosen from); for int8 also int8a8's int8 x int8 product (kernels/int8_matmul.py, the rows' quantizing
launch included).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from glmkit.kernels.gemv import config, gemv
from glmkit.kernels.quant_matmul import QuantMatmul
from glmkit.models.quant import quantize

# (N, K) of the decoder's linear layers and how many of each one decode step reads
SHAPES = {
    "chatglm3-6b": {"qkv": (4608, 4096, 28), "o": (4096, 4096, 28), "gate_up": (27392, 4096, 28),
                    "down": (4096, 13696, 28), "lm_head": (65024, 4096, 1)},
    "glm4-9b": {"qkv": (4608, 4096, 40), "o": (4096, 4096, 40), "gate_up": (27392, 4096, 40),
                "down": (4096, 13696, 40), "lm_head": (151552, 4096, 1)},
}


def graph_time(fn, calls: int) -> float:
    """Seconds per call of fn() (which makes `calls` products), replayed from a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t) / 10 / calls)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="chatglm3-6b")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quant", nargs="+", choices=["int8", "int4"], default=[])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rows", type=int, nargs="+", default=[])
    args = parser.parse_args()
    if args.quant:
        for mode in args.quant:
            if args.rows:
                many_rows(args.shape, int(mode[3:]), args.group_size, args.rows)
            else:
                quantized(args.shape, int(mode[3:]), args.group_size, args.sweep)
        return
    print(f"# {torch.cuda.get_device_name()}, {args.shape}, bf16, one row, torch {torch.__version__}")
    print("| layer | N x K | cuBLAS us | TB/s | glmkit us | TB/s | cuBLAS / glmkit |\n|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name, (N, K, count) in SHAPES[args.shape].items():
        nbytes = N * K * 2
        copies = max(2, int(400e6 // nbytes))
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        theirs = graph_time(lambda: [F.linear(x, w) for w in weights], copies)
        ours = graph_time(lambda: [gemv(x, w) for w in weights], copies)
        totals[0] += theirs * count
        totals[1] += ours * count
        print(f"| {name} | {N} x {K} | {theirs * 1e6:.1f} | {nbytes / theirs / 1e12:.2f} | {ours * 1e6:.1f} | "
              f"{nbytes / ours / 1e12:.2f} | {theirs / ours:.2f} |", flush=True)
        if args.sweep:
            tried = []
            for bn, bk, defer, warps in itertools.product([2, 4, 8, 16], [256, 512, 1024, 2048], [True, False],
                                                          [2, 4, 8]):
                if bn * bk > 16384 or (defer and bn * bk // (32 * warps) > 128):
                    continue
                tiles = (bn, bk, defer, warps)
                tried.append((graph_time(lambda: [gemv(x, w, tiles=tiles) for w in weights], copies), tiles))
            tried.sort()
            print(f"    config() {config(N, K)}; best: " + ", ".join(
                f"{t} {nbytes / s / 1e12:.2f} TB/s" for s, t in tried[:4]), flush=True)
        del weights
        torch.cuda.empty_cache()
    print(f"\nweights of one token: cuBLAS {totals[0] * 1e3:.3f} ms, glmkit {totals[1] * 1e3:.3f} ms "
          f"({totals[0] / totals[1]:.2f}x)")


def quantized(shape: str, bits: int, group_size: int, sweep: bool = False) -> None:
    print(f"\n# {torch.cuda.get_device_name()}, {shape}, int{bits}" + (f" g{group_size}" if bits == 4 else "")
          + ", one row; x bf16 = bf16 GEMV time / quantized time")
    print("| layer | N x K | bf16 us | TB/s | int us | TB/s | x bf16 |\n|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name, (N, K, count) in SHAPES[shape].items():
        copies = max(2, int(400e6 // (N * K * 2)))
        mms = []
        for _ in range(copies):
            q, s = quantize(bits, torch.randn(N, K, device="cuda"), group_size)
            mms.append(QuantMatmul(bits, q, s, group_size, torch.bfloat16))
        nbytes = mms[0].qweight.numel() + mms[0].scales.numel() * mms[0].scales.element_size()
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, copies // 4))]
        base = graph_time(lambda: [gemv(x, w) for w in weights], len(weights))
        del weights
        ours = graph_time(lambda: [mm(x) for mm in mms], copies)
        totals[0] += base * count
        totals[1] += ours * count
        print(f"| {name} | {N} x {K} | {base * 1e6:.1f} | {N * K * 2 / base / 1e12:.2f} | {ours * 1e6:.1f} | "
              f"{nbytes / ours / 1e12:.2f} | {base / ours:.2f} |", flush=True)
        if sweep:  # the single-row kernel's tiles against the tiled kernel's time
            chosen = mms[0].gemv_tiles
            for mm in mms:
                mm.gemv_tiles = None
            tiled = graph_time(lambda: [mm(x) for mm in mms], copies)
            tried = []
            for tiles in itertools.product([2, 4, 8, 16], [256, 512, 1024, 2048], [4, 8]):
                if tiles[0] * tiles[1] > 16384 or tiles[1] < mms[0].block_k // 2:
                    continue
                for mm in mms:
                    mm.gemv_tiles = tiles
                tried.append((graph_time(lambda: [mm(x) for mm in mms], copies), tiles))
            for mm in mms:
                mm.gemv_tiles = chosen
            tried.sort()
            print(f"    tiled kernel {tiled * 1e6:.1f} us; single-row {chosen}; best: " + ", ".join(
                f"{t} {u * 1e6:.1f} us {nbytes / u / 1e12:.2f} TB/s" for u, t in tried[:4]), flush=True)
        del mms
        torch.cuda.empty_cache()
    print(f"\nweights of one token: bf16 {totals[0] * 1e3:.3f} ms, int{bits} {totals[1] * 1e3:.3f} ms "
          f"({totals[0] / totals[1]:.2f}x)")


def many_rows(shape: str, bits: int, group_size: int, rows: list[int]) -> None:
    print(f"\n# {torch.cuda.get_device_name()}, {shape}, int{bits}" + (f" g{group_size}" if bits == 4 else "")
          + "; x bf16 = bf16 cuBLAS time / quantized time")
    a8 = " int8a8 us | x bf16 |" if bits == 8 else ""
    print("| layer | rows | bf16 us | tiled us | x bf16 | dequantize + cuBLAS us | x bf16 |" + a8 + "\n|"
          + "---|" * (9 if a8 else 7))
    for name, (N, K, _) in SHAPES[shape].items():
        copies = 2  # many rows: the products are not bound by reading the weight, L2 matters little
        weights = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        packed = [quantize(bits, w.float(), group_size) for w in weights]
        mms = [QuantMatmul(bits, q, s, group_size, torch.bfloat16) for q, s in packed]
        # int8a8: the same weights with int8 rows (qkv's in two halves, as models/quant.py's REFINED_INPUTS)
        a8s = [QuantMatmul(bits, q, s, group_size, torch.bfloat16, int8_activations=2 if name == "qkv" else 1)
               for q, s in packed] if bits == 8 else []
        for M in rows:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            base = graph_time(lambda: [F.linear(x, w) for w in weights], copies)
            times = []
            for threshold in (M + 1, M):  # the tiled kernel, then the dequantizing path
                for mm in mms:
                    mm.dequant_rows = threshold
                times.append(graph_time(lambda: [mm(x) for mm in mms], copies))
            tiled, dequantized = times
            line = (f"| {name} | {M} | {base * 1e6:.1f} | {tiled * 1e6:.1f} | {base / tiled:.2f} | "
                    f"{dequantized * 1e6:.1f} | {base / dequantized:.2f} |")
            if a8s:
                t = graph_time(lambda: [mm(x) for mm in a8s], copies)
                line += f" {t * 1e6:.1f} | {base / t:.2f} |"
            print(line, flush=True)
        del weights, mms, a8s, packed
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
