"""The epilogue the tiled quantized kernels share (quant_matmul.py, int8_matmul.py): bias, the one rounding to the
output dtype, and split-K's deterministic reduction.

With SPLIT_K > 1 each split writes its fp32 partial tile to a scratch buffer; the last split to arrive (a per-tile
counter, which it resets for the next launch) adds the partials in split order, so the result does not depend on
timing, and stores the tile. Nothing synchronizes with the host: CUDA graphs capture it.
"""

import triton
import triton.language as tl


@triton.jit
def store_tile(acc, b_ptr, out_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_om, pid_m, pid_n, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc: this program's fp32 [BLOCK_M, BLOCK_N] tile (its split's share with SPLIT_K > 1) of out [M, N]."""
    mask_n = offs_n < N
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]  # M * N may pass 2**31
    out_mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_BIAS:  # in fp32, before the one rounding to the output dtype
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        bias = 0.0
    if SPLIT_K == 1:
        tl.store(out_ptrs, (acc + bias).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + pid_k * M * N + tile, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter moves (release below)
        counter = counter_ptr + pid_m * tl.cdiv(N, BLOCK_N) + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(partial_ptr + s * M * N + tile, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, (total + bias).to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter, 0)  # ready for the next launch
