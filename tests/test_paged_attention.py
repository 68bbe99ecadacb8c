"""Paged decode attention (Triton) against a plain PyTorch reference.

Without CUDA the kernels run under Triton's interpreter on CPU tensors, so the sizes stay tiny; with CUDA the same
tests run on the GPU (plus a CUDA-graph capture test).
"""

import math

import pytest
import torch

from triton_kernels import CUDA, DEVICE  # noqa: I001  (before any kernel: sets up the interpreter)
from glmkit.kernels.paged_attention import (
    COMBINE_BLOCK_S,
    MAX_SPLITS,
    choose_num_splits,
    paged_decode_attention,
)

TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def make_case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, cache_dtype=None, spare_blocks=3,
              table_width=None, seed=0):
    """Random q and cache; each sequence's blocks are distinct, shuffled ids; unused table entries are 0."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [math.ceil(n / block_size) for n in seq_lens]
    width = max([table_width or 0, 1, *blocks_needed])
    num_blocks = sum(blocks_needed) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = ids[used:used + n]
        used += n
    cache_dtype = cache_dtype or dtype
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(cache_dtype)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, tables, lens)]


def reference(q, k_cache, v_cache, block_tables, context_lens, block_size):
    """fp64 attention over each sequence's slots, gathered through its block table; rows of length 0 are zeros."""
    batch, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[1]
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    q, k_cache, v_cache = q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double()
    block_tables, context_lens = block_tables.cpu().long(), context_lens.cpu()
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        pos = torch.arange(n)
        slots = block_tables[b, pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache[slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b], k) / math.sqrt(head_dim)
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


def check(out, q, case_args, block_size):
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    expected = reference(*case_args, block_size)
    torch.testing.assert_close(out.cpu().double(), expected, **TOL[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (14, 2), (16, 1)], ids=["group1", "group7", "group16"])
def test_matches_reference(num_heads, num_kv_heads, dtype):
    # 1 token, exactly one block, one past a block boundary, several blocks, a long one.
    seq_lens, block_size = [1, 16, 17, 45, 100], 16
    case = make_case(seq_lens, num_heads, num_kv_heads, 32, block_size, dtype)
    out = paged_decode_attention(*case, block_size, num_splits=1)
    check(out, case[0], case, block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_split_context_matches_reference(num_splits, dtype):
    # block_n 16 over block_size 8: tiles span two blocks; short sequences leave most splits empty.
    seq_lens, block_size = [1, 3, 33, 100], 8
    case = make_case(seq_lens, 14, 2, 16, block_size, dtype, seed=1)
    out = paged_decode_attention(*case, block_size, num_splits=num_splits, block_n=16)
    check(out, case[0], case, block_size)


def test_heuristic_splits_a_lone_long_sequence():
    # One sequence, one kv head, a block table that could describe 320 tokens: the heuristic splits.
    block_size, width, block_n = 8, 40, 16
    case = make_case([97], 7, 1, 16, block_size, torch.float32, table_width=width, seed=2)
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 4
    assert choose_num_splits(1, 1, 16, width, block_size, block_n, sm_count) > 1
    out = paged_decode_attention(*case, block_size, block_n=block_n)
    check(out, case[0], case, block_size)


def test_fp16_and_odd_head_dim():
    block_size = 8
    case = make_case([5, 40], 4, 2, 24, block_size, torch.float16, seed=3)  # head_dim 24: padded to 32, masked
    for splits in (1, 2):
        out = paged_decode_attention(*case, block_size, num_splits=splits, block_n=16)
        check(out, case[0], case, block_size)


def test_cache_dtype_differs_from_query():
    block_size = 16
    case = make_case([7, 30], 4, 1, 16, block_size, torch.float32, cache_dtype=torch.bfloat16, seed=4)
    out = paged_decode_attention(*case, block_size, num_splits=1)
    check(out, case[0], case, block_size)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_zero_length_context_gives_zeros(num_splits):
    block_size = 8
    case = make_case([0, 12, 0], 4, 2, 16, block_size, torch.float32, seed=5)
    out = paged_decode_attention(*case, block_size, num_splits=num_splits, block_n=16)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    check(out, case[0], case, block_size)


def test_empty_batch():
    q = torch.empty(0, 4, 16, device=DEVICE)
    k = torch.randn(32, 2, 16, device=DEVICE)
    tables = torch.empty(0, 4, dtype=torch.int32, device=DEVICE)
    lens = torch.empty(0, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, k, k, tables, lens, 8)
    assert out.shape == (0, 4, 16)


def test_strided_query_and_given_out():
    block_size = 8
    q, k, v, tables, lens = make_case([9, 26], 4, 2, 16, block_size, torch.float32, seed=6)
    wide_q = torch.zeros(2, 4, 48, device=DEVICE)
    wide_q[:, :, 8:24] = q
    q_view = wide_q[:, :, 8:24]                         # not contiguous
    wide_out = torch.full((2, 4, 32), float("nan"), device=DEVICE)
    out_view = wide_out[:, :, :16]
    result = paged_decode_attention(q_view, k, v, tables, lens, block_size, out=out_view, num_splits=2, block_n=16)
    assert result.data_ptr() == out_view.data_ptr()
    check(out_view, q, (q, k, v, tables, lens), block_size)
    assert torch.isnan(wide_out[:, :, 16:]).all()       # nothing written outside out


def test_bad_shapes_raise():
    q = torch.zeros(2, 3, 16, device=DEVICE)
    k = torch.zeros(16, 2, 16, device=DEVICE)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError):
        paged_decode_attention(q, k, k, tables, lens, 8)  # 3 heads over 2 kv heads


def test_choose_num_splits_depends_on_shapes_only():
    # Arguments: batch, kv heads, head_dim, table width, block_size, block_n, SMs.
    # Many sequences fill the GPU alone; fewer are cut into more pieces (twice as many at head_dim 64);
    # a lone long one gets MAX_SPLITS; never more pieces than tiles, never fewer than 1.
    assert choose_num_splits(256, 2, 128, 2048, 16, 64, 132) == 1
    assert choose_num_splits(64, 2, 128, 2048, 16, 64, 132) == 3
    assert choose_num_splits(64, 2, 64, 2048, 16, 64, 132) == 6
    assert choose_num_splits(1, 2, 128, 2048, 16, 64, 132) == MAX_SPLITS
    assert choose_num_splits(1, 2, 128, 4, 16, 64, 132) == 1      # 64 tokens at most: one tile
    assert choose_num_splits(8, 2, 128, 64, 16, 64, 132) == 16    # 1024 tokens: 16 splits of one tile
    assert choose_num_splits(0, 2, 128, 64, 16, 64, 132) == 1


def test_many_splits_combined_in_chunks():
    # More splits than the combine kernel reads at once; most of them empty, one sequence of length 0.
    block_size = 8
    case = make_case([0, 100, 37], 4, 1, 16, block_size, torch.float32, seed=10)
    out = paged_decode_attention(*case, block_size, num_splits=COMBINE_BLOCK_S + 8, block_n=16)
    assert (out[0] == 0).all()
    check(out, case[0], case, block_size)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("num_splits", [None, 1])
def test_cuda_graph_replay_follows_new_lengths_and_tables(num_splits):
    block_size, dtype = 16, torch.bfloat16
    q, k, v, tables, lens = make_case([5, 300, 64], 16, 2, 128, block_size, dtype, table_width=64, seed=7)
    out = torch.empty_like(q)
    paged_decode_attention(q, k, v, tables, lens, block_size, out=out, num_splits=num_splits)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k, v, tables, lens, block_size, out=out, num_splits=num_splits)
    # New lengths and a different block order, written in place; replay must follow them.
    lens.copy_(torch.tensor([300, 1, 0], dtype=torch.int32))
    perm = torch.randperm(k.shape[0] // block_size, generator=torch.Generator().manual_seed(8)).to(torch.int32)
    new_tables = torch.zeros(tables.shape, dtype=torch.int32)
    new_tables[0, :19], new_tables[1, 0] = perm[:19], perm[19]
    tables.copy_(new_tables)
    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    check(out, q, (q, k, v, tables, lens), block_size)
    assert (out[2] == 0).all()
