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

from . import pdl
from .pdl import gdc_launch_dependents, gdc_wait


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
                         PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if PDL:  # kernels/pdl.py: only the weight is read before the wait
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    tl.store(out_ptr + row * n + cols, (xf * inv * w).to(x.dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """-> (rms_norm(x + residual), x + residual); the sum is written into `residual` (or is x itself)."""
    rows, n = x.numel() // x.shape[-1], x.shape[-1]
    out = torch.empty_like(x)
    if rows:
        _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, n, eps,
                                      BLOCK=triton.next_power_of_2(n), HAS_RES=residual is not None,
                                      **pdl.launch(x.device, "add_rms_norm"))
    return out, (residual if residual is not None else x)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
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
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, BLOCK=block,
                                                            **pdl.launch(x.device, "silu_and_mul"))
    return out


@triton.jit
def _rope_and_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
                           stride_t, num_heads, num_kv_heads, cache_stride_slot,
                           HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr,
                           PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    # Program (t, c) takes rows c * BLOCK_R ... of token t's [q heads | k heads | v heads]. Every load comes
    # before the first store, so the memory round trips overlap instead of queueing behind possibly aliasing
    # stores.
    t = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.arange(0, BLOCK_HALF)
    d = tl.arange(0, BLOCK_D)
    n_rot = num_heads + num_kv_heads
    is_k = (r >= num_heads) & (r < n_rot)
    is_v = (r >= n_rot) & (r < n_rot + num_kv_heads)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    row = qkv_ptr + t * stride_t + r[:, None] * HEAD_DIM
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    rot = (r[:, None] < n_rot) & (i[None, :] < HALF)
    x0 = tl.load(row + first[None, :], mask=rot, other=0.0)
    x1 = tl.load(row + second[None, :], mask=rot, other=0.0)
    # what is copied unrotated: the tail of each k head past the rotary dims, and the v heads whole
    rest = ((is_k[:, None] & (d[None, :] >= 2 * HALF)) | is_v[:, None]) & (d[None, :] < HEAD_DIM)
    x_rest = tl.load(row + d[None, :], mask=rest, other=0.0)
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    a, b = x0.to(tl.float32), x1.to(tl.float32)
    r0 = (a * cos[None, :] - b * sin[None, :]).to(x0.dtype)
    r1 = (b * cos[None, :] + a * sin[None, :]).to(x0.dtype)
    tl.store(row + first[None, :], r0, mask=rot)
    tl.store(row + second[None, :], r1, mask=rot)
    kv_head = tl.where(is_k, r - num_heads, r - n_rot)
    k_row = k_cache_ptr + slot * cache_stride_slot + kv_head[:, None] * HEAD_DIM
    v_row = v_cache_ptr + slot * cache_stride_slot + kv_head[:, None] * HEAD_DIM
    k_rot = rot & is_k[:, None]
    tl.store(k_row + first[None, :], r0.to(k_cache_ptr.dtype.element_ty), mask=k_rot)
    tl.store(k_row + second[None, :], r1.to(k_cache_ptr.dtype.element_ty), mask=k_rot)
    tl.store(k_row + d[None, :], x_rest.to(k_cache_ptr.dtype.element_ty), mask=rest & is_k[:, None])
    tl.store(v_row + d[None, :], x_rest.to(v_cache_ptr.dtype.element_ty), mask=rest & is_v[:, None])


ROPE_ROWS = 8  # heads per program of rope_and_cache: ChatGLM3-6B's 34 rotated heads + 2 v heads in 5 programs


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   interleaved: bool, slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   num_heads: int, num_kv_heads: int) -> None:
    """qkv [T, heads + 2 * kv_heads, head_dim] (rows contiguous): q and k rotated in place; k and v of token t
    written to cache slot slot_mapping[t] of k_cache / v_cache [slots, kv_heads, head_dim]."""
    num_tokens, rows, head_dim = qkv.shape
    if num_tokens == 0:
        return
    assert qkv.stride(2) == 1 and qkv.stride(1) == head_dim and k_cache.is_contiguous() and v_cache.is_contiguous()
    half = cos.shape[1]
    block_r = min(ROPE_ROWS, triton.next_power_of_2(rows))
    _rope_and_cache_kernel[(num_tokens, triton.cdiv(rows, block_r))](
        qkv, cos, sin, positions, slot_mapping, k_cache, v_cache, qkv.stride(0), num_heads, num_kv_heads,
        k_cache.stride(0), HEAD_DIM=head_dim, HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(head_dim), INTERLEAVED=interleaved,
        **pdl.launch(qkv.device, "rope_and_cache"))
