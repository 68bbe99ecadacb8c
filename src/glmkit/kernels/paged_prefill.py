"""Prefill attention that reads the paged KV cache directly (Triton): new tokens of several sequences, each
attending causally to its whole context through its block table, in one launch.

This is the attention of a prompt chunk (chunked prefill) and of a prompt whose prefix came from the prefix
cache: the context before the new tokens is already in the cache, and the new tokens' own K/V were just written
there (rope_and_cache), so everything is read from the cache and nothing is gathered into a copy first.

    q             [T, num_heads, head_dim]       the new tokens of all these sequences, packed
    k_cache       [num_blocks * block_size, num_kv_heads, head_dim]   (flat slots, as in paged_attention.py)
    v_cache       same shape as k_cache
    q_starts      int32 [S]   first row of sequence s in q (and in out)
    q_lens        int32 [S]   its new tokens: they sit at positions context_len - q_len ... context_len - 1
    context_lens  int32 [S]   its tokens in the cache, the new ones included
    block_tables  int32 [S, max_blocks]
    out           [T, num_heads, head_dim]; only the rows of these sequences are written

Each program takes BLOCK_Q consecutive new tokens of one sequence and the query heads of one KV group, stacked as
the BLOCK_M = BLOCK_Q * GROUP rows of one tile (row r: token r // GROUP, head r % GROUP), so a K/V tile read from
the cache serves every head that shares it. It walks the context up to its last token's position in tiles of
BLOCK_N cache tokens with an online softmax (fp32, base 2), masking keys past each row's own position. Grid:
(sequences, tiles of the longest q_len, KV heads); programs past their sequence's new tokens return at once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .paged_attention import attend_cache_tile

_LOG2E = 1.4426950408889634
ROWS_PER_PROGRAM = 64  # BLOCK_M: query rows (tokens x heads of a group) per program


@triton.jit
def _paged_prefill_kernel(
    Q, K, V, QS, QL, CL, BT, O,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_bt, stride_btn, stride_ot, stride_oh,
    qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_len = tl.load(QL + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    q_start = tl.load(QS + seq).to(tl.int64)
    ctx = tl.load(CL + seq)

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + r // GROUP_PAD
    head = kv_head * GROUP + r % GROUP_PAD
    row_ok = (tok < q_len) & (r % GROUP_PAD < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    rows = q_start + tok
    q = tl.load(Q + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = ctx - q_len + tok                       # each row's position: it sees keys 0 .. q_pos
    hi = tl.minimum(ctx, ctx - q_len + (q_block + 1) * BLOCK_Q)  # past the tile's last token: nothing to see

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = BT + seq.to(tl.int64) * stride_bt
    k_base = K + kv_head * stride_kh + offs_d[None, :]
    v_base = V + kv_head * stride_vh + offs_d[None, :]
    for start in range(0, hi, BLOCK_N):  # key 0, in the first tile, is one every row sees
        acc, m_i, l_i = attend_cache_tile(q, acc, m_i, l_i, start, hi, q_pos, table, stride_btn, k_base, v_base,
                                          stride_ks, stride_vs, mask_d, qk_scale, BLOCK_N, BLOCK_SIZE,
                                          DOT_PRECISION, CAUSAL=True)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(O + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_starts: torch.Tensor,
                            q_lens: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                            block_size: int, max_q_len: int, out: torch.Tensor) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached context; see the module docstring.
    `max_q_len` is the largest of q_lens (a host number: it sizes the grid). Returns `out`."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads or k_cache.shape[2] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("q, the caches and out need unit stride along head_dim")
    num_seqs = q_lens.shape[0]
    if num_seqs == 0 or max_q_len == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, ROWS_PER_PROGRAM // group_pad)
    block_q = min(block_q, max(16 // group_pad, triton.next_power_of_2(max_q_len)))  # at least 16 rows for tl.dot
    block_d = max(16, triton.next_power_of_2(head_dim))
    dot_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    grid = (num_seqs, triton.cdiv(max_q_len, block_q), num_kv_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, q_starts, q_lens, context_lens, block_tables, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        block_tables.stride(0), block_tables.stride(1), out.stride(0), out.stride(1),
        _LOG2E / math.sqrt(head_dim),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        BLOCK_N=32 if dot_fp32 or block_d > 128 else 64, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if dot_fp32 else "tf32", DOT_FP32=dot_fp32, num_warps=4,
    )
    return out
