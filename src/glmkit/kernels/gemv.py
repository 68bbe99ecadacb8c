"""Matrix-vector product for one decoding row on CUDA (Triton): y = x @ weight.T (+ bias), bf16/fp16.

At batch 1 a decode step is nothing but weight reads, so every linear layer should stream its weight at the
memory's full speed. cuBLAS picks split-K GEMM kernels for these shapes, some with a separate reduction launch.
Over the layers of one ChatGLM3-6B token (benchmarks/gemv.py) this kernel takes 4.12 ms against cuBLAS's 4.53 on
an H100 (2.6-3.1 TB/s against 2.1-2.8 per layer) and 3.04 against 3.43 ms on an H200 (3.3-4.4 TB/s against
2.6-3.9).

    gemv(x [1, K], weight [N, K], bias [N] | None) -> [1, N] in x's dtype

Each program owns BLOCK_N output rows and walks K in BLOCK_K steps: a [BLOCK_N, BLOCK_K] weight tile (each row's
bytes contiguous, 16-byte loads), multiplied by the matching slice of x in fp32; the first tile is loaded before
waiting on the previous kernel (kernels/pdl.py). With DEFER the products are summed element-wise across the walk
and reduced over K once at the end (fewer shuffles: better for short K); otherwise each step reduces its tile
(fewer registers: more programs in flight for wide N). No split-K, so the
result does not depend on timing, and a launch depends only on the shapes: safe inside CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import gdc_launch_dependents, gdc_wait


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DEFER: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if EVEN_N:
        rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    else:  # the last tile's missing rows read row N - 1 again and are not stored
        rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn
    if PDL:  # kernels/pdl.py: the first weight tile is read while the previous kernel finishes
        gdc_launch_dependents()
    w = _weight_tile(rows, offs_k, K, EVEN_K)
    if PDL:
        gdc_wait()
    if DEFER:
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        acc += _product(w, x_ptr, offs_k, K, EVEN_K)
    else:
        total = tl.zeros((BLOCK_N,), tl.float32)
        total += tl.sum(_product(w, x_ptr, offs_k, K, EVEN_K), 1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs_k
        prod = _product(_weight_tile(rows, k, K, EVEN_K), x_ptr, k, K, EVEN_K)
        if DEFER:
            acc += prod
        else:
            total += tl.sum(prod, 1)
    if DEFER:
        total = tl.sum(acc, 1)
    if HAS_BIAS:
        if EVEN_N:
            total += tl.load(b_ptr + offs_n).to(tl.float32)
        else:
            total += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if EVEN_N:
        tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _weight_tile(rows, k, K, EVEN_K: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile at columns k (zeros past K; the int8 GEMV's bytes too)."""
    if EVEN_K:
        return tl.load(rows + k[None, :])
    return tl.load(rows + k[None, :], mask=k[None, :] < K, other=0)


@triton.jit
def _product(w, x_ptr, k, K, EVEN_K: tl.constexpr):
    """w times x's columns k, element-wise in fp32."""
    if EVEN_K:
        a = tl.load(x_ptr + k)
    else:
        a = tl.load(x_ptr + k, mask=k < K, other=0.0)
    return w.to(tl.float32) * a.to(tl.float32)[None, :]


def config(N: int, K: int) -> tuple[int, int, bool, int]:
    """(BLOCK_N, BLOCK_K, DEFER, num_warps): two rows by 2,048 columns per step, 8 warps, reduced per step. Within
    2% of the best for every layer of ChatGLM3-6B in a sweep on an H100 (benchmarks/gemv.py --sweep), where the
    4 x 1024 tiles first chosen on an H200 were 4-9% slower on `o` and `down`; faster than those on an H200 too."""
    return 2, min(2048, max(16, triton.next_power_of_2(K))), False, 8


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         tiles: tuple[int, int, bool, int] | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K].T (+ bias) -> [1, N]; weight rows contiguous, x, weight and bias of one dtype.
    `tiles` (BLOCK_N, BLOCK_K, DEFER, num_warps) overrides the configuration (for tuning)."""
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes x [1, {weight.shape[1]}], got {tuple(x.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("gemv needs the weight's rows contiguous")
    N, K = weight.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    block_n, block_k, defer, warps = tiles or config(N, K)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, bias if bias is not None else weight, out, N, K, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_N=N % block_n == 0, EVEN_K=K % block_k == 0, DEFER=defer,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=1, **pdl.launch(x.device, "gemv"))
    return out
