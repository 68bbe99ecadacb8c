"""Rotary embedding in place on CUDA (Triton): one launch per call instead of a dozen small element-wise kernels.

Rotates the first `rotary_dim` channels of every head of x [T, heads, head_dim] (any strides along T and heads,
contiguous along head_dim) by the angles of each token's position, GPT-J interleaved pairs (2i, 2i+1) as in
ChatGLM or NeoX halves (i, i + rotary_dim/2) as in Llama. cos/sin tables [max_pos, rotary_dim/2]; the arithmetic
is fp32, rounded once to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, pos_ptr, stride_t, stride_h, num_heads,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   INTERLEAVED: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, BLOCK_HALF)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    row = x_ptr + t * stride_t + h[:, None] * stride_h
    mask = (h[:, None] < num_heads) & (i[None, :] < HALF)
    x0 = tl.load(row + first[None, :], mask=mask, other=0.0)
    x1 = tl.load(row + second[None, :], mask=mask, other=0.0)
    a, b = x0.to(tl.float32), x1.to(tl.float32)
    tl.store(row + first[None, :], (a * cos[None, :] - b * sin[None, :]).to(x0.dtype), mask=mask)
    tl.store(row + second[None, :], (b * cos[None, :] + a * sin[None, :]).to(x0.dtype), mask=mask)


def rotary_inplace(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   interleaved: bool) -> torch.Tensor:
    """x [T, heads, head_dim] rotated in place (and returned); positions [T]; cos, sin [max_pos, rot/2]."""
    num_tokens, num_heads, head_dim = x.shape
    if num_tokens == 0:
        return x
    assert x.stride(2) == 1 and cos.is_contiguous() and sin.is_contiguous()
    half = cos.shape[1]
    block_h = min(16, triton.next_power_of_2(num_heads))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _rotary_kernel[grid](x, cos, sin, positions, x.stride(0), x.stride(1), num_heads, HALF=half,
                         BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=block_h, INTERLEAVED=interleaved)
    return x
