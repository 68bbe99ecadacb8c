"""The decoder shared by every family: RMSNorm, rotary embedding, attention over a slot-addressed KV cache,
SwiGLU MLP.

Weights use one internal layout (fused `qkv` rows [q | k | v], fused `gate_up` rows [gate | up]); the family
modules map checkpoint names onto it. The numerics follow ChatGLM's modeling code: RMSNorm variance in fp32,
rotary tables computed in fp32 and cast to the model dtype, KV groups expanded before SDPA.

The attention reads and writes K/V through a flat slot index (`slot_mapping`, per-sequence `kv_slots`), the
shape a paged KV cache hands over; it knows nothing of scheduling or requests. On CUDA, decode attention and the
attention of new tokens after a cached context read the cache in place through block tables
(kernels/paged_attention.py, kernels/paged_prefill.py), and rotary + the K/V writes, add +
RMSNorm and SiLU-and-mul are fused Triton kernels (kernels/fused.py), and single-row products use a GEMV kernel
(kernels/gemv.py); the layers carry the residual stream apart from the hidden state so that each residual add
fuses into the next norm. On a CPU, bf16 inference runs add + RMSNorm, SiLU-and-mul, rotary + the K/V writes and
decode attention as one C call each (kernels/cpu_decode.py) where that extension was built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


@functools.cache
def _cuda_kernels():
    """The Triton kernels of the CUDA path, imported on first use (triton is needed only there) and then kept,
    so the per-layer calls do not repeat the import."""
    from ..kernels import fused, gemv, paged_attention, paged_prefill

    return SimpleNamespace(fused=fused, gemv=gemv.gemv, paged_decode=paged_attention.paged_decode_attention,
                           paged_prefill=paged_prefill.paged_prefill_attention)


@functools.cache
def _cpu_kernels():
    """The C operations of the CPU decode step (kernels/cpu_decode.py), imported on first use."""
    from ..kernels import cpu_decode

    return cpu_decode


@dataclass
class SeqSlice:
    q_start: int                   # first row of this sequence in the flat token batch
    q_len: int                     # new tokens of this sequence in the batch
    kv_slots: torch.Tensor | None  # [context_len] cache slots of all its tokens (None: no past, attend new ones)


@dataclass
class DecodeGroup:
    """Sequences that add one token to a cached context, attended in one batched call: on CPU through their slots
    (`kv_slots`, `mask`; with `context_lens`, one C call of kernels/cpu_decode.py), on CUDA by the paged kernel
    reading the cache through `block_tables`."""
    rows: torch.Tensor | None      # [B] their rows in the flat token batch (None: every row, a decode-only batch)
    kv_slots: torch.Tensor | None = None      # [B, max_context] cache slots, padded
    mask: torch.Tensor | None = None          # [B, 1, 1, max_context] True where a slot is real; None: all real
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32 block ids
    context_lens: torch.Tensor | None = None  # [B] tokens to attend, the new one included (int32; CPU: int64)
    block_size: int = 0


@dataclass
class PromptGroup:
    """Whole prompts of one length with nothing cached: attended together in one batched causal call."""
    rows: torch.Tensor             # [count * length] their rows in the flat token batch, sequence by sequence
    count: int
    length: int


@dataclass
class PagedPrefill:
    """CUDA: new tokens after a cached context (prompt chunks, prompts with a cached prefix), attended over the
    paged cache in one call (kernels/paged_prefill.py). Each sequence's rows are q_starts[s] ... + q_lens[s]."""
    q_starts: torch.Tensor         # [S] int32
    q_lens: torch.Tensor           # [S] int32
    context_lens: torch.Tensor     # [S] int32, the new tokens included
    block_tables: torch.Tensor     # [S, max_blocks] int32
    max_q_len: int
    block_size: int


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor     # [num_tokens] cache slot for each new token's K/V
    seqs: list[SeqSlice]           # the other sequences (prompts and prompt chunks), attended one by one
    decode: DecodeGroup | None = None
    prompt_groups: list[PromptGroup] = field(default_factory=list)
    paged_prefill: PagedPrefill | None = None


class Linear(nn.Linear):
    """nn.Linear whose single-row products on CUDA (a batch-1 decode step) use the GEMV kernel of
    kernels/gemv.py, which reads the weight faster than cuBLAS at those shapes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.shape[0] == 1 and x.dim() == 2 and x.dtype == self.weight.dtype != torch.float32:
            return _cuda_kernels().gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # fused; accumulates in fp32

    def add(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual (norm(x), x). One kernel on CUDA, where the sum
        is written into `residual` in place."""
        if x.is_cuda:
            return _cuda_kernels().fused.add_rms_norm(x, residual, self.weight, self.eps)
        if _cpu_kernels().usable(x, residual, self.weight):  # one C call, in place of eight PyTorch operations
            return _cpu_kernels().add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return self.forward(x), x


class Rotary:
    """cos/sin tables [max_pos, rotary_dim // 2] (the CUDA kernel's) and their full-width forms (`rotate`'s),
    computed in fp32 as the original, grown on demand."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        self.dim, self.base, self.interleaved = config.rotary_dim, config.rope_theta, config.rope_interleaved
        self.dtype, self.device = dtype, device
        self.cos = self.sin = torch.empty(0, self.dim // 2, dtype=dtype, device=device)
        self.cos_full = self.sin_signed = torch.empty(0, self.dim, dtype=dtype, device=device)
        self.fixed = False  # True once sized for every position: no length check (a host sync) per call
        # (positions, their tables) of the step running: DecoderModel.forward clears it, as a step's positions
        # tensor may be a buffer that the next step refills in place
        self.last: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def ensure(self, n: int) -> None:
        """Build the tables for positions < n now and stop checking positions (CUDA graphs need both)."""
        if n > self.cos.shape[0]:
            self._grow(n)
        self.fixed = True

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 2048)
        theta = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=self.device) / self.dim))
        angles = torch.outer(torch.arange(n, dtype=torch.float, device=self.device), theta).float()
        self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        # full-width tables for `rotate`: cos beside itself, sin negated beside itself, laid out as the pairs
        # are (interleaved, or first half against second half)
        join = ((lambda a, b: torch.stack([a, b], -1).flatten(-2)) if self.interleaved
                else (lambda a, b: torch.cat([a, b], -1)))
        self.cos_full, self.sin_signed = join(self.cos, self.cos), join(-self.sin, self.sin)

    def cover(self, positions: torch.Tensor) -> None:
        """Grow the tables to these positions (unless sized for every position already)."""
        if not self.fixed and positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            self._grow(int(positions.max()) + 1)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotate`'s full-width tables [T, 1, rotary_dim] at these positions [T]. Every layer of a step asks
        for the same positions tensor: its tables are gathered once and handed out again."""
        if self.last is not None and self.last[0] is positions:
            return self.last[1]
        self.cover(positions)
        tables = (self.cos_full.index_select(0, positions)[:, None, :],
                  self.sin_signed.index_select(0, positions)[:, None, :])
        self.last = positions, tables
        return tables

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; positions: [T]. (On CUDA the attention uses kernels/fused.py instead.)"""
        return rotate(x, *self.tables(positions), self.dim, self.interleaved)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of the first `dim` of each head. x: [T, heads, head_dim]; cos, sin: [T, 1, dim], the
    tables of Rotary.tables. Each pair (a, b) becomes (a cos - b sin, b cos + a sin), computed as x * cos +
    swapped(x) * signed sin: the same roundings as the pairwise form, in four operations rather than ten."""
    rot = x[..., :dim]
    if interleaved:
        swapped = rot.unflatten(-1, (dim // 2, 2)).flip(-1).flatten(-2)
    else:
        swapped = torch.cat([rot[..., dim // 2:], rot[..., : dim // 2]], -1)
    rot = rot * cos + swapped * sin
    return rot if dim == x.shape[-1] else torch.cat([rot, x[..., dim:]], -1)


def expand_kv(kv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[..., S, G, D] -> [..., S, H, D], group g serving heads g*H/G ... (g+1)*H/G - 1 as ChatGLM does."""
    *lead, length, groups, dim = kv.shape
    return kv.unsqueeze(-2).expand(*lead, length, groups, num_heads // groups, dim).reshape(*lead, length, num_heads, dim)


def attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One new token per sequence. q: [B, H, D]; k, v: [B, S, G, D] -> [B, H*D].

    Each KV group serves its H/G heads through a grouped matmul (no expanded copy of K/V); softmax in fp32. On
    a CPU this is several times faster than SDPA for a single query row.
    """
    num_seqs, num_heads, head_dim = q.shape
    groups = k.shape[2]
    # One sequence: bmm on views of its K/V, no copies (a quarter faster). For several, the same bmm form
    # copies K/V into [B*G, D, S] and measured 3x slower than the broadcast matmul below.
    if num_seqs == 1:
        qg = q.float().view(groups, num_heads // groups, head_dim)
        scores = torch.bmm(qg, k[0].float().permute(1, 2, 0)).mul_(head_dim ** -0.5)  # [G, H/G, S]
        if mask is not None:
            scores = scores.masked_fill(~mask[0], float("-inf"))
        out = torch.bmm(torch.softmax(scores, dim=-1), v[0].float().transpose(0, 1)).view(1, num_heads * head_dim)
        return out.to(q.dtype)
    # fp32 throughout: for these small products it is also several times faster than bf16 on a CPU
    qg = q.float().reshape(num_seqs, groups, num_heads // groups, head_dim)
    scores = torch.matmul(qg, k.float().permute(0, 2, 3, 1)) * head_dim ** -0.5  # [B, G, H/G, S]
    if mask is not None:  # [B, 1, 1, S]
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float().transpose(1, 2)).reshape(num_seqs, num_heads * head_dim)
    return out.to(q.dtype)


def attend_prompts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of B whole prompts of one length. q: [B, L, H, D]; k, v: [B, L, G, D] -> [B * L, H*D]."""
    count, length, num_heads, head_dim = q.shape
    k, v = expand_kv(k, num_heads), expand_kv(v, num_heads)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(count * length, num_heads * head_dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last q_len positions. q: [L, H, D]; k, v: [S, G, D] with S >= L. -> [L, H*D]."""
    num_q, num_heads, head_dim = q.shape
    num_kv = k.shape[0]
    k, v = expand_kv(k, num_heads), expand_kv(v, num_heads)
    q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (q, k, v))  # [1, H, len, D]
    if num_q == num_kv:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif num_q == 1:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        mask = torch.ones(num_q, num_kv, dtype=torch.bool, device=q.device).tril(num_kv - num_q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.permute(2, 0, 1, 3).reshape(num_q, num_heads * head_dim)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias)
        self.o = Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x, positions, batch: AttentionBatch, kv_cache, rotary: Rotary):
        num_tokens, heads, groups = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(num_tokens, heads + 2 * groups, self.head_dim)
        k_cache, v_cache = kv_cache
        if qkv.is_cuda and rotary.fixed:  # rotary in place and the K/V cache writes in one launch
            _cuda_kernels().fused.rope_and_cache(qkv, positions, rotary.cos, rotary.sin, rotary.interleaved,
                                                 batch.slot_mapping, k_cache, v_cache, heads, groups)
            q, k, v = qkv.split([heads, groups, groups], dim=1)
        elif (_cpu_kernels().usable(qkv, k_cache, v_cache, rotary.cos_full)
              and positions.dtype == batch.slot_mapping.dtype == torch.int64):
            # the same in one C call, over tables DecoderModel.forward has grown to these positions
            _cpu_kernels().rope_and_cache(qkv, positions, rotary.cos_full, rotary.sin_signed, rotary.interleaved,
                                          batch.slot_mapping, k_cache, v_cache, heads, groups)
            q, k, v = qkv.split([heads, groups, groups], dim=1)
        else:
            q, k = rotary(qkv[:, : heads + groups], positions).split([heads, groups], dim=1)  # one rotary call
            v = qkv[:, heads + groups:]
            k_cache.index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
            v_cache.index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))
        d = batch.decode
        if d is not None and d.rows is None:  # a decode-only batch (what CUDA graphs capture): no row scatter
            return self.o(self._decode(q, kv_cache, d))
        out = torch.empty(num_tokens, self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        for g in batch.prompt_groups:
            shape = (g.count, g.length, -1, self.head_dim)
            out[g.rows] = attend_prompts(q[g.rows].view(shape), k[g.rows].view(shape), v[g.rows].view(shape))
        p = batch.paged_prefill
        if p is not None:
            _cuda_kernels().paged_prefill(q, k_cache, v_cache, p.q_starts, p.q_lens, p.context_lens,
                                          p.block_tables, p.block_size, p.max_q_len,
                                          out.view(num_tokens, heads, self.head_dim))
        for s in batch.seqs:
            rows = slice(s.q_start, s.q_start + s.q_len)
            if s.kv_slots is None:
                out[rows] = attend(q[rows], k[rows], v[rows])
            else:
                k_ctx, v_ctx = (c.index_select(0, s.kv_slots).to(q.dtype) for c in kv_cache)
                out[rows] = attend(q[rows], k_ctx, v_ctx)
        if d is not None:
            out[d.rows] = self._decode(q[d.rows], kv_cache, d)
        return self.o(out)

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache, d: DecodeGroup) -> torch.Tensor:
        """q [B, H, D] of one new token per sequence -> [B, H*D]."""
        if d.block_tables is not None:  # CUDA: the Triton kernel reads the paged cache in place
            out = _cuda_kernels().paged_decode(q, kv_cache[0], kv_cache[1], d.block_tables, d.context_lens,
                                               d.block_size)
            return out.view(q.shape[0], -1)
        cpu = _cpu_kernels()
        if (d.context_lens is not None and d.kv_slots.is_contiguous() and q.dtype == torch.bfloat16
                and q.stride(2) == 1 and q.stride(1) == q.shape[2] and cpu.usable(*kv_cache)):
            return cpu.decode_attention(q, kv_cache[0], kv_cache[1], d.kv_slots, d.context_lens)
        flat = d.kv_slots.view(-1)
        k_ctx, v_ctx = (c.index_select(0, flat).view(*d.kv_slots.shape, *c.shape[1:]).to(q.dtype)
                        for c in kv_cache)  # [B, S, G, D]
        return attend_decode(q, k_ctx, v_ctx, d.mask)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate_up = self.gate_up(x)
        if gate_up.is_cuda:
            return self.down(_cuda_kernels().fused.silu_and_mul(gate_up))
        if _cpu_kernels().usable(gate_up):
            return self.down(_cpu_kernels().silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, positions, batch, kv_cache, rotary):
        """The residual stream is carried apart from x so that each add fuses into the next norm (on CUDA)."""
        h, residual = self.attn_norm.add(x, residual)
        h = self.attn(h, positions, batch, kv_cache, rotary)
        h, residual = self.mlp_norm.add(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: Rotary | None = None

    def finish_loading(self) -> None:
        """Called once the weights are in place: ties the head if asked, builds the rotary tables."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(self.config, self.embed.weight.dtype, self.embed.weight.device)

    def forward(self, input_ids, positions, batch: AttentionBatch, kv_caches) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        x, residual = self.embed(input_ids), None
        self.rotary.last = None
        self.rotary.cover(positions)  # once a step, for every layer's rotary (the C call refuses what is past it)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, batch, kv_cache, self.rotary)
        return self.norm.add(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32."""
        return self.lm_head(hidden).float()
