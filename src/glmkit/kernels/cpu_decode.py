"""The small operations of a CPU decode step in one C call each (kernels/cpu_decode.c, built at install time):
add + RMSNorm, SiLU-and-mul, rotary + the K/V cache writes, and decode attention over the cached K/V.
models/layers.py uses them for bf16 tensors that need no gradient, where the extension was built (`available()`),
and PyTorch's operations otherwise; the arithmetic is the same, in fp32, rounded to bf16 where PyTorch rounds (up
to the order of sums).
GLMKIT_CPU_DECODE=0 (read at import) runs PyTorch's operations instead, for A/B runs.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    from . import _cpu_decode
except ImportError:  # not built (no compiler at install time): the PyTorch path runs
    _cpu_decode = None
if os.environ.get("GLMKIT_CPU_DECODE", "1") == "0":
    _cpu_decode = None
_BUILT = _cpu_decode


@contextlib.contextmanager
def using(on: bool):
    """Within the block, the C operations run if `on` (and were built), PyTorch's otherwise (benchmarks' A/B)."""
    global _cpu_decode
    previous, _cpu_decode = _cpu_decode, (_BUILT if on else None)
    try:
        yield
    finally:
        _cpu_decode = previous


def available() -> bool:
    return _cpu_decode is not None


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether these tensors can take the C path: built, bf16 CPU tensors, contiguous rows, no gradient."""
    if _cpu_decode is None or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return False
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous())
               for t in tensors)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual) * weight, x + residual); the sum is written into `residual` (or is x itself)."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    _cpu_decode.add_rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(), weight.data_ptr(),
                             out.data_ptr(), x.numel() // n, n, eps, torch.get_num_threads())
    return out, (x if residual is None else residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2F] = [gate | up] -> silu(gate) * up [T, F]."""
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, n, dtype=x.dtype)
    if rows:
        _cpu_decode.silu_mul(x.data_ptr(), out.data_ptr(), rows, n, torch.get_num_threads())
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] (each row's heads contiguous), caches [slots, G, D] contiguous, slots int64 [B, S] (contiguous),
    lengths int64 [B]: sequence b attends to the cache rows at its first lengths[b] slots -> [B, H * D]."""
    seqs, heads, dim = q.shape
    assert q.stride(2) == 1 and q.stride(1) == dim and slots.dtype == lengths.dtype == torch.int64
    out = torch.empty(seqs, heads * dim, dtype=q.dtype)
    if seqs:
        _cpu_decode.decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                     slots.data_ptr(), lengths.data_ptr(), out.data_ptr(), seqs, heads,
                                     k_cache.shape[1], dim, slots.shape[1], torch.get_num_threads())
    return out


def rope_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                   slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                   num_kv_heads: int) -> None:
    """qkv [T, heads + 2 * kv_heads, head_dim] (contiguous): q and k rotated in place on their first cos.shape[1]
    values (cos, sin: Rotary's full-width tables, covering every position); token t's k and v written to row
    slot_mapping[t] of k_cache / v_cache [slots, kv_heads, head_dim]. positions, slot_mapping int64."""
    tokens, _, dim = qkv.shape
    assert positions.dtype == slot_mapping.dtype == torch.int64 and cos.is_contiguous() and sin.is_contiguous()
    _cpu_decode.rope_and_cache(qkv.data_ptr(), tokens, num_heads, num_kv_heads, dim, cos.shape[1], interleaved,
                               cos.data_ptr(), sin.data_ptr(), cos.shape[0], positions.data_ptr(),
                               slot_mapping.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), torch.get_num_threads())
