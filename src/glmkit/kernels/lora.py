"""Batched LoRA for rows of many adapters in one pass (Triton; SGMV style): y[t] += (A[s] @ x[t]) @ B[s], s = the
slot of row t's adapter; rows of the base model are left alone.

The adapters' weights live in pools allocated once, so a captured CUDA graph can replay with other adapters in
the same slots (only the rows' slots, LoraRows filled from the host, change between replays):

    a_pool [slots, W, K]   each slot's A (several targets stacked)
    b_pool [slots, W, N]   each slot's B transposed and laid out over the whole output, scale folded in (row i
                           goes with A's row i; each row's N values contiguous)
    rows                   which rows use which slot, both ways (LoraRows, from group_rows):
      slots  [>= T] int32  each row's slot, -1 for none
      order  [>= T] int32  the adapted rows, grouped by slot
      starts [slots + 1]   slot s's rows are order[starts[s]:starts[s + 1]]
A slot's rows of A and B beyond its adapter's rank hold zeros (the pool's owner writes them so), so no rank is
read before the weights: one dependent load less in kernels whose time at small batches is mostly latency.

Two launches either way: `shrink` computes A @ x in pieces of K (one program walking all of K waits on memory
once per tile: 25 us per linear on an H200), `expand` sums a row's pieces in a fixed order and adds v @ B to
BLOCK_N outputs of y. No atomics: results do not depend on timing. Two layouts of the work, chosen by the number
of rows (measured on an H200, ChatGLM3-6B's linears, 8 adapters of rank 16, benchmarks/adapters.py):
  - up to PER_ROW rows, a program per row (BGMV): each row's latency chain is shortest (slot, then weights);
  - more, a program per slot (SGMV): a weight tile is read once for all of that adapter's rows and multiplied 16
    rows at a time on the tensor cores (a program per row reads it once per row: at 64 rows over 8 adapters
    that cost more than the base layer itself). Programs of a slot without rows return at once.
`expand` is the second half alone, for rows whose A @ x for every slot came with the base product
(models/adapters.py keeps the slots' A under a float base weight, so one GEMV or GEMM computes both).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per tensor-core product (its smallest M)
PER_ROW = 8  # up to this many rows, a program per row (below)
PIECES = 8  # K is cut into at most this many pieces: expand sums [ROWS, PIECES, R] partials per row block


class LoraRows(NamedTuple):
    slots: torch.Tensor
    order: torch.Tensor
    starts: torch.Tensor


def group_rows(row_slots: list[int], num_slots: int) -> tuple[list[int], list[int]]:
    """(order, starts) for rows with these slots (-1: no adapter), as add_lora takes them."""
    order = sorted((i for i, s in enumerate(row_slots) if s >= 0), key=lambda i: row_slots[i])
    starts = [0] * (num_slots + 1)
    for s in row_slots:
        if s >= 0:
            starts[s + 1] += 1
    for s in range(num_slots):
        starts[s + 1] += starts[s]
    return order, starts


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, order_ptr, starts_ptr, part_ptr, K, stride_xt, stride_as, stride_ar,
                   stride_pt, stride_ps, W, IEEE: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                   CHUNK: tl.constexpr, SUB_K: tl.constexpr):
    slot = tl.program_id(0)
    piece = tl.program_id(1)
    first = tl.load(starts_ptr + slot)
    last = tl.load(starts_ptr + slot + 1)
    if first == last:
        return
    offs_r = tl.arange(0, BLOCK_R)
    offs_m = tl.arange(0, ROWS)
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None].to(tl.int64) * stride_ar
    for r0 in range(first, last, ROWS):
        m = r0 + offs_m
        rows = tl.load(order_ptr + m, mask=m < last, other=0).to(tl.int64)
        acc = tl.zeros((ROWS, BLOCK_R), tl.float32)
        for k0 in range(piece * CHUNK, piece * CHUNK + CHUNK, SUB_K):
            k = k0 + tl.arange(0, SUB_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :], mask=(m[:, None] < last) & (k[None, :] < K),
                        other=0.0)
            a = tl.load(a_rows + k[None, :], mask=(offs_r[:, None] < W) & (k[None, :] < K), other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(a), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(a))
        tl.store(part_ptr + rows[:, None] * stride_pt + piece * stride_ps + offs_r[None, :], acc,
                 mask=m[:, None] < last)


@triton.jit
def _expand_kernel(part_ptr, b_ptr, order_ptr, starts_ptr, y_ptr, N, NUM_PIECES, stride_pt, stride_ps, slot_stride,
                   stride_bs, stride_br, stride_yt, W, IEEE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    slot = tl.program_id(0)
    first = tl.load(starts_ptr + slot)
    last = tl.load(starts_ptr + slot + 1)
    if first == last:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    offs_m = tl.arange(0, ROWS)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None].to(tl.int64) * stride_br + offs_n[None, :],
                mask=(offs_r[:, None] < W) & (offs_n[None, :] < N), other=0.0)
    for r0 in range(first, last, ROWS):
        m = r0 + offs_m
        rows = tl.load(order_ptr + m, mask=m < last, other=0).to(tl.int64)
        parts = tl.load(part_ptr + slot * slot_stride + rows[:, None, None] * stride_pt
                        + offs_p[None, :, None] * stride_ps + offs_r[None, None, :],
                        mask=(m[:, None, None] < last) & (offs_p[None, :, None] < NUM_PIECES)
                        & (offs_r[None, None, :] < W), other=0.0)
        v = tl.sum(parts, 1)  # the pieces of K in a fixed order
        if IEEE:
            update = tl.dot(v, b.to(tl.float32), input_precision="ieee")
        else:
            update = tl.dot(v.to(b.dtype), b)
        out = y_ptr + rows[:, None] * stride_yt + offs_n[None, :]
        keep = (m[:, None] < last) & (offs_n[None, :] < N)
        y = tl.load(out, mask=keep, other=0.0)
        tl.store(out, (y.to(tl.float32) + update).to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _shrink_rows_kernel(x_ptr, a_ptr, slots_ptr, part_ptr, K, stride_xt, stride_as, stride_ar, stride_pt, stride_ps,
                        W, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + t.to(tl.int64) * stride_xt + k, mask=k < K, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None].to(tl.int64) * stride_ar + k[None, :],
                mask=(offs_r[:, None] < W) & (k[None, :] < K), other=0.0)
    tl.store(part_ptr + t.to(tl.int64) * stride_pt + tl.program_id(1) * stride_ps + offs_r,
             tl.sum(a.to(tl.float32) * x[None, :], 1))


@triton.jit
def _expand_rows_kernel(part_ptr, b_ptr, slots_ptr, y_ptr, N, NUM_PIECES, stride_pt, stride_ps, slot_stride,
                        stride_bs, stride_br, stride_yt, W, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_P: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    parts = tl.load(part_ptr + t.to(tl.int64) * stride_pt + slot * slot_stride + offs_p[:, None] * stride_ps
                    + offs_r[None, :], mask=(offs_p[:, None] < NUM_PIECES) & (offs_r[None, :] < W), other=0.0)
    v = tl.sum(parts, 0)  # the pieces of K in a fixed order
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None].to(tl.int64) * stride_br + offs_n[None, :],
                mask=(offs_r[:, None] < W) & (offs_n[None, :] < N), other=0.0)
    update = tl.sum(b.to(tl.float32) * v[:, None], 0)
    out = y_ptr + t.to(tl.int64) * stride_yt + offs_n
    y = tl.load(out, mask=offs_n < N, other=0.0)
    tl.store(out, (y.to(tl.float32) + update).to(y_ptr.dtype.element_ty), mask=offs_n < N)


def add_lora(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
             rows: LoraRows) -> torch.Tensor:
    """y [T, N] += each adapted row's update, in place (see the module's docstring for the shapes); returns y."""
    T, K = x.shape
    slots, W, N = a_pool.shape[0], a_pool.shape[1], b_pool.shape[2]
    if y.shape != (T, N) or a_pool.shape[2] != K or b_pool.shape != (slots, W, N) or \
            rows.starts.shape != (slots + 1,) or rows.slots.shape[0] < T:
        raise ValueError(f"add_lora: y {tuple(y.shape)}, x {tuple(x.shape)}, a_pool {tuple(a_pool.shape)}, "
                         f"b_pool {tuple(b_pool.shape)}, rows {[tuple(t.shape) for t in rows]} do not fit")
    if T == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    if y.stride(1) != 1:
        raise ValueError("add_lora adds into y in place and needs its rows contiguous")
    block_r = max(16, triton.next_power_of_2(W))
    if T <= PER_ROW:  # a program per row
        block_k = max(32, min(256, 4096 // block_r))
        pieces = triton.cdiv(K, block_k)
        parts = torch.empty(T, pieces, block_r, dtype=torch.float32, device=x.device)
        _shrink_rows_kernel[(T, pieces)](x, a_pool, rows.slots, parts, K, x.stride(0), a_pool.stride(0),
                                         a_pool.stride(1), parts.stride(0), parts.stride(1), W, BLOCK_R=block_r,
                                         BLOCK_K=block_k, num_warps=4)
        block_n = 128
        _expand_rows_kernel[(T, triton.cdiv(N, block_n))](
            parts, b_pool, rows.slots, y, N, pieces, parts.stride(0), parts.stride(1), 0, b_pool.stride(0),
            b_pool.stride(1), y.stride(0), W, BLOCK_N=block_n, BLOCK_R=block_r,
            BLOCK_P=triton.next_power_of_2(pieces), num_warps=4)
        return y
    ieee = x.dtype == torch.float32  # fp32 models stay fp32 (no TF32)
    sub_k = max(16, min(256, 4096 // block_r))  # an [R, SUB_K] tile of A per product
    chunk = max(sub_k, triton.next_power_of_2(triton.cdiv(K, PIECES)))
    pieces = triton.cdiv(K, chunk)
    parts = torch.empty(T, pieces, block_r, dtype=torch.float32, device=x.device)
    _shrink_kernel[(slots, pieces)](x, a_pool, rows.order, rows.starts, parts, K, x.stride(0), a_pool.stride(0),
                                    a_pool.stride(1), parts.stride(0), parts.stride(1), W, IEEE=ieee, ROWS=ROWS,
                                    BLOCK_R=block_r, CHUNK=chunk, SUB_K=sub_k, num_warps=4)
    block_n = 256 if block_r <= 16 else 128 if block_r <= 32 else 64
    _expand_kernel[(slots, triton.cdiv(N, block_n))](
        parts, b_pool, rows.order, rows.starts, y, N, pieces, parts.stride(0), parts.stride(1), 0, b_pool.stride(0),
        b_pool.stride(1), y.stride(0), W, IEEE=ieee, ROWS=ROWS, BLOCK_N=block_n, BLOCK_R=block_r,
        BLOCK_P=triton.next_power_of_2(pieces), num_warps=4)
    return y


def expand(y: torch.Tensor, v_all: torch.Tensor, b_pool: torch.Tensor, rows: LoraRows) -> torch.Tensor:
    """The second half alone: y [T, N] += v_all[t, s * W:(s + 1) * W] @ B[s] for each adapted row t (slot s),
    where v_all [T, slots * W] holds every slot's A @ x, computed with the base product (models/adapters.py
    keeps the slots' A under the base weight, so one GEMM or GEMV gives both); returns y. Rows may be strided."""
    slots, W, N = b_pool.shape
    T = y.shape[0]
    if y.shape != (T, N) or v_all.shape != (T, slots * W) or rows.slots.shape[0] < T or y.stride(1) != 1 \
            or v_all.stride(1) != 1:
        raise ValueError(f"expand: y {tuple(y.shape)}, v_all {tuple(v_all.shape)}, b_pool {tuple(b_pool.shape)}")
    if T == 0:
        return y
    block_r = max(16, triton.next_power_of_2(W))
    if T <= PER_ROW:
        block_n = 128
        _expand_rows_kernel[(T, triton.cdiv(N, block_n))](
            v_all, b_pool, rows.slots, y, N, 1, v_all.stride(0), 0, W, b_pool.stride(0), b_pool.stride(1),
            y.stride(0), W, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_P=1, num_warps=4)
        return y
    block_n = 256 if block_r <= 16 else 128 if block_r <= 32 else 64
    _expand_kernel[(slots, triton.cdiv(N, block_n))](
        v_all, b_pool, rows.order, rows.starts, y, N, 1, v_all.stride(0), 0, W, b_pool.stride(0), b_pool.stride(1),
        y.stride(0), W, IEEE=y.dtype == torch.float32, ROWS=ROWS, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_P=1,
        num_warps=4)
    return y


def lora_rows(row_slots: list[int], num_slots: int, device) -> LoraRows:
    """The rows' slots (-1: none) as add_lora takes them."""
    order, starts = group_rows(row_slots, num_slots)
    return LoraRows(*(torch.tensor(t, dtype=torch.int32, device=device) for t in (row_slots, order, starts)))
