"""Decode attention that reads the paged KV cache directly (Triton).

One new query token per sequence attends to its cached context, looked up through the sequence's block table:

    q             [B, num_heads, head_dim]
    k_cache       [num_blocks * block_size, num_kv_heads, head_dim]   (flat slots: block_id * block_size + offset)
    v_cache       same shape as k_cache
    block_tables  int32 [B, max_blocks_per_seq]   (unused entries any valid block id, e.g. 0)
    context_lens  int32 [B]   tokens to attend, the new one included (its K/V already written)
    -> out        [B, num_heads, head_dim], q's dtype

Design
------
* One program per (sequence, kv head, split). The query heads of a GQA group share their K/V, so a program loads
  them together as a [BLOCK_H, BLOCK_D] tile (BLOCK_H = max(16, next_pow2(heads per group)), padded rows masked)
  and both products are `tl.dot`s, which can use tensor cores. Head h uses kv head h // (num_heads // num_kv_heads).
* The context is walked in tiles of BLOCK_N tokens with an online softmax (fp32, base 2). A tile may span several
  cache blocks: each token's block id is read from the block table, so any block_size works.
* Flash-decoding: with few (sequence, kv head) pairs and a long possible context, the context is cut into
  `num_splits` pieces, one program each; every piece writes its normalised partial output and log-sum-exp to a
  scratch buffer (fp32, allocated per call) and a small second kernel combines them. Each sequence's own length is
  divided evenly among the splits on the device (rounded up to BLOCK_N tokens); a short sequence leaves the later
  splits empty, and an empty split returns at once.
* CUDA-graph friendly: the grid, tile sizes and `num_splits` depend only on shapes (B, heads, head_dim, dtype,
  block_tables.shape[1]) and the device's SM count, never on the values of `context_lens` or `block_tables`,
  and nothing is copied to the host. Capture after a warm-up call (the first call of each shape compiles).
* context_lens of 0 gives zeros in those rows (no NaNs). B == 0 returns an empty tensor.
* The cache may hold another dtype than q: K/V tiles are cast to q's dtype (fp32 for fp32 q) before the products.
  Softmax statistics and accumulators are fp32; with bf16/fp16 q the probabilities enter the P@V product in that
  dtype, as in flash attention.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported),
on CPU tensors; that is how the tests run on machines without CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import gdc_launch_dependents, gdc_wait

__all__ = ["paged_decode_attention", "choose_num_splits", "default_block_n", "attend_cache_tile"]

# Split heuristic (see choose_num_splits); tuned on an H200 with bf16, head_dim 64 and 128, block_size 16.
MAX_SPLITS = 128
MIN_TILES_PER_SPLIT = 1      # a split walks at least this many BLOCK_N tiles of the longest possible context
PROGRAMS_PER_SM = 3          # target programs per SM at head_dim 128 (twice as many at 64)
COMBINE_BLOCK_S = 32         # splits the combine kernel reads at a time
_NO_CUDA_SM_COUNT = 4        # stand-in SM count for CPU tensors (Triton interpreter)

_LOG2E = 1.4426950408889634


@triton.jit
def attend_cache_tile(q, acc, m_i, l_i, start, hi, q_pos, table, stride_table, k_base, v_base, stride_ks, stride_vs,
                      mask_d, qk_scale, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, CAUSAL: tl.constexpr):
    """One step of an online softmax (fp32, base 2) over cache tokens start ... start + BLOCK_N - 1 below `hi`,
    found through a block-table row (`table`, `stride_table`): q [rows, D] against the K and V tiles read by slot
    from `k_base` / `v_base` (pointers [1, D] at the KV head). With CAUSAL, row r sees keys up to q_pos[r] only.
    Returns the updated (acc, m_i, l_i). The decode and prefill kernels walk their contexts with it; the first
    tile of a walk must hold a key that every row sees, so each row's maximum is finite from then on."""
    offs_n = start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < hi
    block_ids = tl.load(table + (offs_n // BLOCK_SIZE) * stride_table, mask=mask_n, other=0)
    slots = block_ids.to(tl.int64) * BLOCK_SIZE + (offs_n % BLOCK_SIZE)
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_base + slots[:, None] * stride_ks, mask=mask_nd, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale   # [rows, BLOCK_N], log2 units
    visible = mask_n[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= q_pos[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + slots[:, None] * stride_vs, mask=mask_nd, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_decode_kernel(
    Q, K, V, BT, CL, O, O_PART, LSE,
    stride_qb, stride_qh, stride_qd,
    stride_ks, stride_kh, stride_kd,
    stride_vs, stride_vh, stride_vd,
    stride_btb, stride_btn,
    stride_cl,
    stride_ob, stride_oh, stride_od,
    qk_scale,
    num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # kernels/pdl.py
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq64 = seq.to(tl.int64)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    mask_hd = mask_h[:, None] & mask_d[None, :]
    heads = kv_head * GROUP + offs_h

    q_ptrs = Q + seq64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_hd, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)  # both products (and the K/V tiles) in fp32

    ctx = tl.load(CL + seq64 * stride_cl).to(tl.int32)
    if not SPLIT:
        lo = 0
        hi = ctx
    else:
        per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, ctx)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    bt_row = BT + seq64 * stride_btb
    k_base = K + kv_head * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + kv_head * stride_vh + offs_d[None, :] * stride_vd

    for start in range(lo, hi, BLOCK_N):  # every tile walked holds at least one real token
        acc, m_i, l_i = attend_cache_tile(q, acc, m_i, l_i, start, hi, hi, bt_row, stride_btn, k_base, v_base,
                                          stride_ks, stride_vs, mask_d, qk_scale, BLOCK_N, BLOCK_SIZE,
                                          DOT_PRECISION, CAUSAL=False)

    has_tokens = l_i > 0.0
    out = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    if not SPLIT:
        o_ptrs = O + seq64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=mask_hd)
    else:
        rows = (seq64 * NUM_HEADS + heads) * num_splits + split          # [BLOCK_H] rows of [B, H, S]
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(LSE + rows, lse, mask=mask_h)
        # An empty split writes only its -inf LSE; the combine never reads its partial output.
        if lo < hi:
            tl.store(O_PART + rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_hd)


@triton.jit
def _combine_splits_kernel(
    O_PART, LSE, O,
    stride_ob, stride_oh, stride_od,
    num_splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    first_row = (seq * NUM_HEADS + head) * num_splits

    m = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        rows = s0 + offs_s
        m = tl.maximum(m, tl.load(LSE + first_row + rows, mask=rows < num_splits, other=float("-inf")))
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all > float("-inf"), m_all, 0.0)   # every split empty (context 0): weights 0, output 0

    denom = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        rows = s0 + offs_s
        lse = tl.load(LSE + first_row + rows, mask=rows < num_splits, other=float("-inf"))
        valid = lse > float("-inf")                        # empty splits wrote no partial output
        w = tl.where(valid, tl.exp2(lse - m_all), 0.0)
        part = tl.load(O_PART + (first_row + rows)[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=valid[:, None] & mask_d[None, :], other=0.0)
        denom += w
        acc += w[:, None] * part
    total = tl.sum(denom, 0)
    out = tl.sum(acc, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(O + seq * stride_ob + head * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty), mask=mask_d)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _NO_CUDA_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def default_block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Context tokens per tile: 64, or 32 where a K+V tile would be large (fp32, or head_dim above 128)."""
    if dtype == torch.float32 or triton.next_power_of_2(head_dim) > 128:
        return 32
    return 64


def choose_num_splits(batch: int, num_kv_heads: int, head_dim: int, max_blocks_per_seq: int, block_size: int,
                      block_n: int, sm_count: int) -> int:
    """How many pieces to cut each context into; a function of shapes only, so CUDA graphs can capture it.

    Split while there are fewer (sequence, kv head) programs than a target of PROGRAMS_PER_SM per SM (more for
    head_dim under 128: each program then moves fewer bytes), and only as far as the longest context the block
    table can describe still gives each piece MIN_TILES_PER_SPLIT tiles; never past MAX_SPLITS.
    """
    programs = batch * num_kv_heads
    if programs <= 0:
        return 1
    per_sm = PROGRAMS_PER_SM * max(1, 128 // triton.next_power_of_2(head_dim))
    by_occupancy = (per_sm * sm_count) // programs
    by_length = (max_blocks_per_seq * block_size) // (MIN_TILES_PER_SPLIT * block_n)
    return max(1, min(by_length, by_occupancy, MAX_SPLITS))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           out: torch.Tensor | None = None, *, num_splits: int | None = None,
                           block_n: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context; see the module docstring for shapes.

    `out` ([B, num_heads, head_dim], q's dtype, any strides) receives the result if given. `num_splits` and
    `block_n` override the heuristics (tuning and tests); both must stay fixed for a captured graph.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, num_heads, head_dim], got {tuple(q.shape)}")
    batch, num_heads, head_dim = q.shape
    if k_cache.dim() != 3 or k_cache.shape[2] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [slots, num_kv_heads, {head_dim}] and alike, "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError(f"block_tables must be [B, max_blocks] and context_lens [B] with B = {batch}, "
                         f"got {tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if batch == 0 or num_heads == 0:
        return out

    group = num_heads // num_kv_heads
    block_h = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_n is None:
        block_n = default_block_n(head_dim, q.dtype)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError("block_n must be a power of two >= 16")
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, head_dim, block_tables.shape[1], block_size, block_n,
                                       _device_sm_count(q.device))
    num_splits = max(1, int(num_splits))
    # Triton's interpreter computes bf16 on raw bit patterns: off the GPU, bf16 operands go through fp32.
    dot_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda)
    dot_precision = "ieee" if dot_fp32 else "tf32"
    qk_scale = _LOG2E / math.sqrt(head_dim)

    if num_splits == 1:
        o_part = lse = out  # unused placeholders
    else:
        o_part = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)

    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
            q, k_cache, v_cache, block_tables, context_lens, out, o_part, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_tables.stride(0), block_tables.stride(1),
            context_lens.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            qk_scale, num_splits,
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=block_size, SPLIT=num_splits > 1,
            BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n, DOT_PRECISION=dot_precision,
            DOT_FP32=dot_fp32, num_warps=4, **pdl.launch(q.device, "paged_decode"),
        )
        if num_splits > 1:
            _combine_splits_kernel[(batch, num_heads)](
                o_part, lse, out,
                out.stride(0), out.stride(1), out.stride(2), num_splits,
                NUM_HEADS=num_heads, HEAD_DIM=head_dim,
                BLOCK_S=min(COMBINE_BLOCK_S, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
                num_warps=4, **pdl.launch(q.device, "combine_splits"),
            )
    return out

