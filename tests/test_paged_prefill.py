"""Paged prefill attention (Triton) against fp64 causal attention over each sequence's gathered context.

Without CUDA the kernel runs under Triton's interpreter on CPU tensors (sizes stay tiny); with CUDA the same tests
run on the GPU in bf16 as well.
"""

import math
import pytest
import torch

from triton_kernels import CUDA, DEVICE  # noqa: I001  (before any kernel: sets up the interpreter)
from glmkit.kernels.paged_prefill import paged_prefill_attention

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def make_case(contexts, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Shuffled distinct blocks per sequence; q packed with two unused rows between sequences."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(c / block_size) for c in contexts]
    num_blocks = sum(needed) + 2
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(contexts), max(needed), dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = ids[used:used + n]
        used += n
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    starts, row = [], 0
    for n in q_lens:
        starts.append(row)
        row += n + 2
    q = torch.randn(row, num_heads, head_dim, generator=gen).to(dtype)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return (q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), as_int(starts), as_int(q_lens), as_int(contexts),
            tables.to(DEVICE))


def reference(q, k_cache, v_cache, starts, q_lens, contexts, tables, block_size):
    group = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    q, k_cache, v_cache = q.cpu().double(), k_cache.cpu().double(), v_cache.cpu().double()
    for s, (start, n, ctx) in enumerate(zip(starts.tolist(), q_lens.tolist(), contexts.tolist())):
        slots = [int(tables[s, t // block_size]) * block_size + t % block_size for t in range(ctx)]
        k = k_cache[slots].repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
        v = v_cache[slots].repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[start:start + n].transpose(0, 1)                           # [H, n, D]
        scores = qs @ k.transpose(1, 2) / math.sqrt(q.shape[2])
        positions = torch.arange(ctx - n, ctx)
        scores = scores.masked_fill(torch.arange(ctx)[None, :] > positions[:, None], float("-inf"))
        out[start:start + n] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(8, 2, 32, 16), (7, 1, 16, 5), (4, 4, 24, 8)])
def test_matches_reference(dtype, heads, kv_heads, head_dim, block_size):
    # a prompt with a cached prefix, a chunk in the middle of a long prompt, a fresh prompt, a single token
    contexts, q_lens = [40, 70, 9, 23], [13, 16, 9, 1]
    case = make_case(contexts, q_lens, heads, kv_heads, head_dim, block_size, dtype)
    q = case[0]
    out = torch.full_like(q, 7.0)
    paged_prefill_attention(*case, block_size=block_size, max_q_len=max(q_lens), out=out)
    ref = reference(*case, block_size)
    written = torch.zeros(q.shape[0], dtype=torch.bool)
    for start, n in zip(case[3].tolist(), q_lens):
        written[start:start + n] = True
    torch.testing.assert_close(out.cpu().double()[written], ref[written], atol=TOL[dtype], rtol=TOL[dtype])
    assert (out.cpu()[~written] == 7.0).all()  # rows of no sequence are left alone


def test_long_chunk_over_many_tiles():
    contexts, q_lens = [300], [150]
    case = make_case(contexts, q_lens, 4, 2, 16, 16, torch.float32, seed=3)
    out = torch.zeros_like(case[0])
    paged_prefill_attention(*case, block_size=16, max_q_len=150, out=out)
    ref = reference(*case, 16)
    torch.testing.assert_close(out.cpu().double()[:150], ref[:150], atol=2e-5, rtol=2e-5)


def test_rejects_mismatched_cache():
    q = torch.zeros(4, 6, 16, device=DEVICE)
    cache = torch.zeros(32, 4, 16, device=DEVICE)  # 6 heads do not share 4 KV heads
    ids = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        paged_prefill_attention(q, cache, cache, ids, ids + 4, ids + 4, ids.view(1, 1), 16, 4, torch.zeros_like(q))
