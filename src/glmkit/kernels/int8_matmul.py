"""int8 x int8 products on tensor cores for CUDA (Triton): the GPU side of int8a8 (W8A8).

    q, qs = quantize_rows(x, k_pad, halves)    x [M, K] -> a: int8 [halves, M, k_pad], (step, mid) fp32 [halves, 2, M]
    int8_matmul(q, qs, qweight, scales, row_sums, bias, out, counters, block_k, config(...))
        out [M, N] = sum over halves of (step * (a @ qweight.T) + mid * row_sums) * scales (+ bias)

Each row of x is quantized on its own range, centred on it (x ~= mid + step * a, a in [-127, 127], rounded half
up), so a row's result does not depend on the rows beside it, as on the CPU (models/cpu_int8.py). The midpoint
costs nothing in the loop: x @ q.T = step * (a @ q.T) + mid * (row sums of q, kept beside the weight). Centring
matters: rounding symmetric about zero (a = x * 127 / max|x|) cost the default model +1.12% perplexity against
fp32, centred rows +0.61% (`benchmarks/perplexity.py --modes fp32 int8a8-cuda` emulates this rounding). With
`halves` = 2 the rounding error is quantized again the same way (about 16 bits in all: what int8a8 gives the
sensitive qkv projection); the kernel multiplies both halves by each weight tile it loads and adds them in fp32
at the end.

The product runs on int8 tensor cores (mma / wgmma s8.s8.s32) with int32 sums over the whole of K, the weight bytes
going in as they are stored (glmkit's int8 layout, `qweight` [N, k_pad], K contiguous, which is what the
tensor cores want of the second operand): nothing is converted inside the loop, where the W8A16 kernel
(quant_matmul.py) turns every weight byte into bf16. Scales, bias and the one rounding to the output dtype
come at the end, in fp32. On an H200 over ChatGLM3-6B's linears (`benchmarks/gemv.py --quant int8 --rows`),
both launches together against bf16 cuBLAS: 64 rows 0.87-1.92x (the W8A16 kernel 0.62-1.31x), 256 rows
0.55-1.49x (W8A16 0.39-0.59x); the lowest is qkv, whose two halves double the multiplies.

Split-K (a GPU that the output tiles alone cannot fill) works as in quant_matmul.py: fp32 partials, the last split
to arrive adds them in split order (deterministic). Nothing synchronizes with the host: CUDA graphs capture it.
Without a GPU it runs under Triton's interpreter (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .split_k import store_tile


@triton.jit
def _round_row(x, valid):
    """A row x (fp32; `valid` marks its columns) -> int8 a, and mid and step with x ~= mid + step * a: a spans
    [-127, 127] over the row's own range, rounded half up (a = 0 and step = 0 for a constant row)."""
    hi = tl.max(tl.where(valid, x, -float("inf")), axis=0)
    lo = tl.min(tl.where(valid, x, float("inf")), axis=0)
    mid = (hi + lo) * 0.5
    step = (hi - lo) / 254.0
    inv = tl.where(step > 0, 1.0 / tl.maximum(step, 1e-30), 0.0)
    a = ((x - mid) * inv + 128.5).to(tl.int32) - 128  # (x - mid) * inv in [-127, 127]: shifted positive, so floor
    a = tl.where(valid, a, 0)
    return a.to(tl.int8), mid, step


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, K_PAD, stride_xm, HALVES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK)
    valid = k < K
    x = tl.load(x_ptr + row * stride_xm + k, mask=valid, other=0.0).to(tl.float32)
    a, mid, step = _round_row(x, valid)
    tl.store(q_ptr + row * K_PAD + k, a, mask=k < K_PAD)  # zero columns up to the weight's padding
    tl.store(s_ptr + row, step)
    tl.store(s_ptr + M + row, mid)
    if HALVES == 2:
        r = x - (mid + a.to(tl.float32) * step)
        a2, mid2, step2 = _round_row(r, valid)
        tl.store(q_ptr + (M + row) * K_PAD + k, a2, mask=k < K_PAD)
        tl.store(s_ptr + 2 * M + row, step2)
        tl.store(s_ptr + 3 * M + row, mid2)


@triton.jit
def _int8_matmul_kernel(q_ptr, qs_ptr, w_ptr, ws_ptr, wsum_ptr, b_ptr, out_ptr, partial_ptr, counter_ptr,
                        M, N, K_PAD, stride_wn, stride_om, k_tiles, tiles_per_split,
                        HALVES: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    grid_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % grid_m  # programs sharing an N tile run side by side: its weight bytes come from L2 after one
    pid_n = pid // grid_m
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_rows = q_ptr + offs_m[:, None] * K_PAD
    w_cols = w_ptr + offs_n[None, :] * stride_wn  # [1, BLOCK_N]; K runs along each weight row

    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for t in range(t_begin, t_end):
        k = t * BLOCK_K + offs_k
        w = tl.load(w_cols + k[:, None], mask=mask_n[None, :], other=0)
        a = tl.load(a_rows + k[None, :], mask=mask_m[:, None], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)  # |sum| <= 127 * 128 * K: int32 up to K of 130,000
        if HALVES == 2:
            a2 = tl.load(a_rows + M * K_PAD + k[None, :], mask=mask_m[:, None], other=0)
            acc2 = tl.dot(a2, w, acc2, out_dtype=tl.int32)

    # x ~= mid + step * a per row and half: x @ q.T = step * (a @ q.T) + mid * (sum of q's row), the last term
    # for the whole of K, so from the first split only
    total = acc.to(tl.float32) * tl.load(qs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    mid = tl.load(qs_ptr + M + offs_m, mask=mask_m, other=0.0)
    if HALVES == 2:
        total += acc2.to(tl.float32) * tl.load(qs_ptr + 2 * M + offs_m, mask=mask_m, other=0.0)[:, None]
        mid += tl.load(qs_ptr + 3 * M + offs_m, mask=mask_m, other=0.0)
    if pid_k == 0:
        total += mid[:, None] * tl.load(wsum_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    total = total * tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)[None, :]

    store_tile(total, b_ptr, out_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_om, pid_m, pid_n, pid_k,
               HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


def quantize_rows(x: torch.Tensor, k_pad: int, halves: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K contiguous) -> (a: int8 [halves, M, k_pad], fp32 [halves, 2, M]: each half's (step, mid)),
    x ~= sum over halves of mid + step * a; columns K..k_pad of a are zero."""
    M, K = x.shape
    q = torch.empty(halves, M, k_pad, dtype=torch.int8, device=x.device)
    s = torch.empty(halves, 2, M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k_pad)
    _quantize_rows_kernel[(M,)](x, q, s, M, K, k_pad, x.stride(0), HALVES=halves, BLOCK=block,
                                num_warps=8 if block > 4096 else 4)
    return q, s


def weight_row_sums(qweight: torch.Tensor) -> torch.Tensor:
    """fp32 [N]: each int8 weight row's sum (exact: at most 128 * K, under 2**24 for K up to 131,072), what a
    row's midpoint multiplies."""
    return qweight.sum(1, dtype=torch.int32).float()


# Tiles from a sweep on an H200 over ChatGLM3-6B's linears at 16, 64 and 256 rows (benchmarks/gemv.py --rows).
MAX_SPLIT_K = 8
MAX_SCRATCH = 16 << 20  # bytes of fp32 split-K partials


def config(M: int, N: int, k_tiles: int, sms: int, counters: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages) for M rows of a [N, k_tiles * 128] weight: a function of
    the shapes alone (CUDA graphs replay the launch they captured)."""
    if M <= 16:
        block_m, block_n, warps, stages, min_tiles = 16, 64, 4, 4, 16
    elif M <= 64:
        block_m, warps, stages, min_tiles = 64, 4, 4, 16
        block_n = 128 if triton.cdiv(N, 128) >= sms else 64
    else:
        wide = triton.cdiv(M, 128) * triton.cdiv(N, 128) >= sms
        block_m, block_n, warps, stages, min_tiles = (128 if wide else 64), 128, (8 if wide else 4), 3, 32
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split = 1  # split K while the output tiles cannot fill two programs per SM, each split min_tiles K tiles long
    while (split * 2 * tiles <= 2 * sms and k_tiles // (split * 2) >= min_tiles and split * 2 <= MAX_SPLIT_K
           and split * 2 * M * N * 4 <= MAX_SCRATCH and tiles <= counters):
        split *= 2
    return block_m, block_n, split, warps, stages


def int8_matmul(q: torch.Tensor, qs: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                row_sums: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, counters: torch.Tensor,
                block_k: int, cfg: tuple[int, int, int, int, int]) -> torch.Tensor:
    """out [M, N] = (rows quantized by quantize_rows: q, qs) @ (qweight [N, k_pad] int8 * scales [N] fp32).T
    (+ bias); `row_sums` fp32 [N]: the sum of each row of qweight (see weight_row_sums)."""
    halves, M, k_pad = q.shape
    N = qweight.shape[0]
    block_m, block_n, split, warps, stages = cfg
    k_tiles = k_pad // block_k
    tiles_per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, tiles_per_split)  # no empty splits
    partial = torch.empty(split, M, N, dtype=torch.float32, device=q.device) if split > 1 else out
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n), split)
    _int8_matmul_kernel[grid](
        q, qs, qweight, scales, row_sums, scales if bias is None else bias, out, partial, counters,
        M, N, k_pad, qweight.stride(0), out.stride(0), k_tiles, tiles_per_split,
        HALVES=halves, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps, num_stages=stages)
    return out
