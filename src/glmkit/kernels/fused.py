"""Fused element-wise kernels for CUDA (Triton): at batch 1 a decode step is ~450 small kernels around the
matmuls, each costing a few microseconds however little it does, so the decoder fuses what it can:

  add_rms_norm     residual += x; out = rms_norm(residual) * weight          (two launches -> one)
  silu_and_mul     out = silu(gate) * up from the fused [gate | up] rows        (two launches -> one)
  rope_and_cache   rotary on the q and k heads in place, then k and v into their cache slots (three -> one)

The arithmetic is fp32, rounded once to the tensors' dtype, as in the PyTorch paths they replace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr, HAS_RES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, (xf * inv * w).to(x.dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """-> (rms_norm(x + residual), x + residual); the sum is written into `residual` (or is x itself)."""
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    out = torch.empty_like(x)
    if rows:
        _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, n, eps,
                                      BLOCK=triton.next_power_of_2(n), HAS_RES=residual is not None)
    return out, (residual if residual is not None else x)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * 2 * n + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    tl.store(out_ptr + row * n + cols, (g / (1.0 + tl.exp(-g)) * up).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2F] = [gate | up] (contiguous) -> silu(gate) * up [T, F]."""
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows:
        block = 1024
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, BLOCK=block)
    return out


@triton.jit
def _rope_and_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                           stride_t, num_heads, num_kv_heads, cache_stride_slot,
                           HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                           INTERLEAVED: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    row = qkv_ptr + t * stride_t
    # 1. rotate the q and k heads (rows 0 .. num_heads + num_kv_heads - 1) in place
    i = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    mask = (h[:, None] < num_heads + num_kv_heads) & (i[None, :] < HALF)
    ptrs = row + h[:, None] * HEAD_DIM
    x0 = tl.load(ptrs + first[None, :], mask=mask, other=0.0)
    x1 = tl.load(ptrs + second[None, :], mask=mask, other=0.0)
    a, b = x0.to(tl.float32), x1.to(tl.float32)
    r0 = (a * cos[None, :] - b * sin[None, :]).to(x0.dtype)
    r1 = (b * cos[None, :] + a * sin[None, :]).to(x0.dtype)
    tl.store(ptrs + first[None, :], r0, mask=mask)
    tl.store(ptrs + second[None, :], r1, mask=mask)
    # 2. the rotated part of each k head into the cache, straight from registers
    kv_head = h - num_heads
    is_k = mask & (kv_head[:, None] >= 0)
    cache = k_cache_ptr + slot * cache_stride_slot + kv_head[:, None] * HEAD_DIM
    tl.store(cache + first[None, :], r0.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    tl.store(cache + second[None, :], r1.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    # 3. the unrotated tail of each k head, and the v heads, copied as they are
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    tail = (g[:, None] < num_kv_heads) & (d[None, :] >= 2 * HALF) & (d[None, :] < HEAD_DIM)
    k_tail = tl.load(row + (num_heads + g[:, None]) * HEAD_DIM + d[None, :], mask=tail, other=0.0)
    tl.store(k_cache_ptr + slot * cache_stride_slot + g[:, None] * HEAD_DIM + d[None, :],
             k_tail.to(k_cache_ptr.dtype.element_ty), mask=tail)
    full = (g[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM)
    v = tl.load(row + (num_heads + num_kv_heads + g[:, None]) * HEAD_DIM + d[None, :], mask=full, other=0.0)
    tl.store(v_cache_ptr + slot * cache_stride_slot + g[:, None] * HEAD_DIM + d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=full)


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   interleaved: bool, slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   num_heads: int, num_kv_heads: int) -> None:
    """qkv [T, heads + 2 * kv_heads, head_dim] (rows contiguous): q and k rotated in place; k and v of token t
    written to cache slot slot_mapping[t] of k_cache / v_cache [slots, kv_heads, head_dim]."""
    num_tokens, _, head_dim = qkv.shape
    if num_tokens == 0:
        return
    assert qkv.stride(2) == 1 and qkv.stride(1) == head_dim and k_cache.is_contiguous() and v_cache.is_contiguous()
    half = cos.shape[1]
    _rope_and_cache_kernel[(num_tokens,)](
        qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, qkv.stride(0), num_heads, num_kv_heads,
        k_cache.stride(0), HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_H=triton.next_power_of_2(num_heads + num_kv_heads), BLOCK_G=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), INTERLEAVED=interleaved)
