"""The decoder's training path: whole sequences at once, no KV cache, autograd all the way, and the loss over
the target tokens only.

It runs the same modules (and so the same weights and numerics) as inference in layers.py: RMSNorm, the
rotary tables, the fused qkv/gate_up linears (LoRA-wrapped or not), grouped KV heads expanded as ChatGLM does.
What differs is only what inference needs and training cannot use: the cache writes, the paged kernels and the
fused Triton kernels (they have no backward). Packed rows keep attention inside each sample and restart
positions at 0 per sample. Layers can be recomputed in the backward pass (activation checkpointing), and the
loss is taken in chunks so the [tokens, vocab] logits never exist whole. Knows nothing of data files or
optimizers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .layers import DecoderLayer, DecoderModel, expand_kv, rotate

LOSS_CHUNK = 1024  # target tokens whose logits exist at once (1024 x 151,936 fp32 = 0.6 GB at most)


def positions_and_mask(lengths: list[list[int]], seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row, the samples packed into it (their lengths, in order) -> positions [B, L] restarting at 0 per
    sample, and a boolean attention mask [B, 1, L, L] (causal within each sample; None when every row holds
    one sample, where plain causal attention is the same). Padding after the samples attends to itself only."""
    positions = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    packed = any(len(row) > 1 for row in lengths)
    doc = torch.full((len(lengths), seq_len), -1, dtype=torch.long)
    for b, row in enumerate(lengths):
        start = 0
        for i, n in enumerate(row):
            positions[b, start:start + n] = torch.arange(n)
            doc[b, start:start + n] = i
            start += n
        doc[b, start:] = torch.arange(len(row), len(row) + seq_len - start)  # padding: a sample of its own
    if not packed:
        return positions.to(device), None
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return positions.to(device), mask[:, None].to(device)


def _layer(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, rotary_dim: int,
           interleaved: bool, prefix_k: torch.Tensor | None = None,
           prefix_v: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, hidden] -> [B, L, hidden]: attention and MLP with their residual adds. cos, sin: the rotary
    tables at each token's position [B * L, 1, rotary_dim // 2] (the same for every layer). prefix_k/v
    [P, groups, head_dim]: a P-Tuning prefix put before the keys and values (unrotated); `mask` then covers it."""
    batch, length, _ = x.shape
    attn = layer.attn
    heads, groups, dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    h = layer.attn_norm(x)
    qkv = attn.qkv(h).view(batch * length, heads + 2 * groups, dim)
    q, k = rotate(qkv[:, : heads + groups], cos, sin, rotary_dim, interleaved).split([heads, groups], dim=1)
    v = qkv[:, heads + groups:]
    q = q.view(batch, length, heads, dim).transpose(1, 2)  # [B, H, L, D]
    k, v = k.view(batch, length, groups, dim), v.view(batch, length, groups, dim)
    if prefix_k is not None:  # [P, G, D] before every row's keys and values
        k = torch.cat([prefix_k.expand(batch, *prefix_k.shape), k], dim=1)
        v = torch.cat([prefix_v.expand(batch, *prefix_v.shape), v], dim=1)
    if q.is_cuda:  # the kernels read each KV group for its heads: no expanded copy
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    else:
        k, v = expand_kv(k, heads).transpose(1, 2), expand_kv(v, heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    x = x + attn.o(out.transpose(1, 2).reshape(batch, length, heads * dim))
    gate, up = layer.mlp.gate_up(layer.mlp_norm(x)).chunk(2, dim=-1)
    return x + layer.mlp.down(F.silu(gate) * up)


def _recomputed_layer(*args) -> torch.Tensor:
    """A layer whose activations are recomputed in the backward pass instead of kept."""
    return checkpoint(_layer, *args, use_reentrant=False)


_compiled: dict[bool, object] = {}
# Compiled with recomputation: the share of the layer's activations the graph may keep for the backward pass
# (torch's partitioner recomputes the cheapest rest). On an H200, ChatGLM3-6B shape, LoRA r=32, 4 x 768 tokens
# (benchmarks/finetune_gpu.py): 0.1 made 1.98x transformers + peft's tokens/s at 15.8 GB against their 16.5;
# 0.12 makes 2.03x at 16.53 GB against their 16.54 (0.13 the same; 0.15 2.01x at 16.5).
ACTIVATION_BUDGET = 0.12


def _layer_fn(recompute: bool, compiled: bool):
    """The layer function. Eager: with `recompute`, checkpointed (everything recomputed in the backward pass).
    Compiled (torch.compile, once; one graph serves every layer): the norms, rotary, SiLU-and-mul and the
    adapters' adds fuse into a few kernels, and with `recompute` the partitioner chooses what to recompute
    within ACTIVATION_BUDGET."""
    if not compiled:
        return _recomputed_layer if recompute else _layer
    if recompute not in _compiled:
        import torch._functorch.config as functorch_config

        compiled_layer = torch.compile(_layer, dynamic=True)
        budget = ACTIVATION_BUDGET if recompute else 1.0

        def run(*args):  # compiling happens at a call (and again on a recompile): the budget is set around each
            with functorch_config.patch(activation_memory_budget=budget):
                return compiled_layer(*args)

        _compiled[recompute] = run
    return _compiled[recompute]


def prefix_mask(mask: torch.Tensor | None, batch: int, length: int, prefix_len: int, device) -> torch.Tensor:
    """The attention mask with a prefix every query sees: [B, 1, L, P + L]."""
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    mask = mask.expand(batch, 1, length, length)
    return torch.cat([torch.ones(batch, 1, length, prefix_len, dtype=torch.bool, device=device), mask], dim=-1)


def hidden_states(model: DecoderModel, input_ids: torch.Tensor, positions: torch.Tensor, mask=None,
                  recompute: bool = False, compiled: bool = False, prefix=None) -> torch.Tensor:
    """input_ids, positions [B, L] -> final hidden states [B, L, hidden] (after the last norm). `prefix`: per
    layer (keys, values) [P, groups, head_dim] of a P-Tuning v2 prefix (models/ptuning.py)."""
    x = model.embed(input_ids)
    if recompute and x.requires_grad is False:
        x.requires_grad_(True)  # so checkpointed layers of a frozen base still pass gradients to the adapters
    rotary = model.rotary
    cos, sin = rotary.tables(positions.reshape(-1))
    layer_fn = _layer_fn(recompute, compiled)
    if prefix is not None:
        mask = prefix_mask(mask, input_ids.shape[0], input_ids.shape[1], prefix[0][0].shape[0], input_ids.device)
    for i, layer in enumerate(model.layers):
        kv = prefix[i] if prefix is not None else (None, None)
        x = layer_fn(layer, x, cos, sin, mask, rotary.dim, rotary.interleaved, *kv)
    return model.norm(x)


def _chunk_loss(model: DecoderModel, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.lm_head(hidden).float(), targets, reduction="sum")


class _FrozenHeadLoss(torch.autograd.Function):
    """The summed loss of [N, hidden] states through a frozen output layer, its gradient taken chunk by chunk in
    the forward pass and kept ([N, hidden], the size of the states): the logits are computed once, not again in
    the backward pass."""

    @staticmethod
    def forward(ctx, hidden, model, targets):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for start in range(0, targets.numel(), LOSS_CHUNK):
            rows = slice(start, start + LOSS_CHUNK)
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(True)
                loss = _chunk_loss(model, h, targets[rows])
                grad[rows], = torch.autograd.grad(loss, h)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad, = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def target_loss(model: DecoderModel, hidden: torch.Tensor, input_ids: torch.Tensor,
                loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of every target token (loss_mask[b, t]: input_ids[b, t] is predicted from position
    t - 1). Only target positions reach the output layer, in chunks. A frozen output layer (LoRA and P-Tuning
    leave it alone) has its gradient taken in the forward pass; a trained one is recomputed in the backward."""
    select = loss_mask[:, 1:]
    h = hidden[:, :-1][select]             # [N, hidden]
    targets = input_ids[:, 1:][select]     # [N]
    training = torch.is_grad_enabled()
    if training and h.requires_grad and not any(p.requires_grad for p in model.lm_head.parameters()):
        return _FrozenHeadLoss.apply(h, model, targets)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), LOSS_CHUNK):
        rows = slice(start, start + LOSS_CHUNK)
        if training:
            total = total + checkpoint(_chunk_loss, model, h[rows], targets[rows], use_reentrant=False)
        else:
            total = total + _chunk_loss(model, h[rows], targets[rows])
    return total
