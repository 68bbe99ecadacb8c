"""The CPU decode step's small operations in C (kernels/cpu_decode.c) against the PyTorch code they replace, and a
model decoding the same tokens with them as without them."""

import pytest
import torch
import torch.nn.functional as F

from glmkit import LLM, SamplingParams
from glmkit.kernels import cpu_decode
from glmkit.models.config import ModelConfig
from glmkit.models.layers import Rotary, attend_decode, rotate

pytestmark = pytest.mark.skipif(not cpu_decode.available(), reason="kernels/cpu_decode.c was not built")


def bf16(*shape, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).bfloat16()


def assert_nearly_equal(got, ref):
    """Equal but for an element or so in a thousand one bf16 step apart (the order of fp32 sums; near zero, where
    terms cancel, a step of the fp32 sums)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    step = ref.float().abs() * 2 ** -7 + ref.float().abs().max() * 2 ** -20
    assert ((got.float() - ref.float()).abs() <= step).all()
    assert (got != ref).float().mean() <= 1e-3


@pytest.mark.parametrize("rows,n", [(1, 896), (5, 896), (3, 37)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_pytorch(rows, n, with_residual):
    x, residual, weight = bf16(rows, n, scale=3, seed=1), bf16(rows, n, seed=2), bf16(n, seed=3) + 1
    ref_sum = x + residual if with_residual else x
    ref = F.rms_norm(ref_sum, (n,), weight, 1e-6)
    given = residual.clone() if with_residual else None
    out, total = cpu_decode.add_rms_norm(x, given, weight, 1e-6)
    assert torch.equal(total, ref_sum)  # one bf16 rounding of the fp32 sum, as PyTorch's add
    if with_residual:
        assert total is given  # written into the residual, as the CUDA kernel does
    assert_nearly_equal(out, ref)


@pytest.mark.parametrize("rows,n", [(1, 4864), (4, 4864), (2, 11)])
def test_silu_mul_matches_pytorch(rows, n):
    x = bf16(rows, 2 * n, scale=4, seed=4)
    gate, up = x.chunk(2, dim=-1)
    assert_nearly_equal(cpu_decode.silu_mul(x), F.silu(gate) * up)


@pytest.mark.parametrize("heads,kv_heads,dim", [(14, 2, 64), (4, 4, 40), (8, 1, 128)])  # 40: no 8-wide path
def test_decode_attention_matches_attend_decode(heads, kv_heads, dim):
    cache_k, cache_v = bf16(600, kv_heads, dim, scale=3, seed=5), bf16(600, kv_heads, dim, seed=6)
    qkv = bf16(4, heads + 2 * kv_heads, dim, seed=7)
    q = qkv[:, :heads]  # a view of the qkv rows, as the layer passes it
    lengths = torch.tensor([300, 57, 1, 300])
    gen = torch.Generator().manual_seed(8)
    slots = torch.stack([torch.randperm(600, generator=gen)[:300] for _ in range(4)])
    mask = (torch.arange(300)[None, :] < lengths[:, None])[:, None, None, :]
    ref = attend_decode(q, cache_k[slots], cache_v[slots], mask)
    assert_nearly_equal(cpu_decode.decode_attention(q, cache_k, cache_v, slots, lengths), ref)


def test_decode_attention_without_context_gives_zeros():
    cache = bf16(8, 2, 64, seed=9)
    out = cpu_decode.decode_attention(bf16(2, 4, 64, seed=10), cache, cache, torch.zeros(2, 3, dtype=torch.long),
                                      torch.tensor([0, 3]))
    assert not out[0].any() and out[1].abs().sum() > 0


@pytest.mark.parametrize("interleaved,rotary_dim", [(True, 32), (False, 64), (False, 32)])
def test_rope_and_cache_matches_rotate_and_index_copy(interleaved, rotary_dim):
    heads, kv_heads, dim = 6, 2, 64
    config = ModelConfig("glm", "test", vocab_size=16, hidden_size=heads * dim, num_layers=1, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=dim, intermediate_size=8, rms_norm_eps=1e-6,
                         rope_theta=10000.0, rotary_dim=rotary_dim, rope_interleaved=interleaved, qkv_bias=False,
                         tie_word_embeddings=False, max_position_embeddings=4096)
    rotary = Rotary(config, torch.bfloat16, torch.device("cpu"))
    positions, slots = torch.tensor([0, 5, 3000]), torch.tensor([7, 2, 11])  # 3000: past the first tables
    rotary.cover(positions)
    qkv = bf16(3, heads + 2 * kv_heads, dim, seed=11)
    ref = qkv.clone()
    ref[:, :heads + kv_heads] = rotate(ref[:, :heads + kv_heads], *rotary.tables(positions), rotary_dim, interleaved)
    ref_k, ref_v = torch.zeros(12, kv_heads, dim, dtype=torch.bfloat16), torch.zeros(12, kv_heads, dim,
                                                                                      dtype=torch.bfloat16)
    ref_k.index_copy_(0, slots, ref[:, heads:heads + kv_heads])
    ref_v.index_copy_(0, slots, ref[:, heads + kv_heads:])
    k_cache, v_cache = torch.zeros_like(ref_k), torch.zeros_like(ref_v)
    cpu_decode.rope_and_cache(qkv, positions, rotary.cos_full, rotary.sin_signed, interleaved, slots, k_cache,
                              v_cache, heads, kv_heads)
    assert torch.equal(qkv, ref) and torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # bit for bit
    with pytest.raises(ValueError, match="outside the rotary tables"):
        cpu_decode.rope_and_cache(qkv, torch.tensor([0, 1, rotary.cos_full.shape[0]]), rotary.cos_full,
                                  rotary.sin_signed, interleaved, slots, k_cache, v_cache, heads, kv_heads)


def test_only_bf16_tensors_without_gradients_take_it():
    x = bf16(2, 8)
    assert cpu_decode.usable(x, None)
    assert not cpu_decode.usable(x.float())
    assert not cpu_decode.usable(x.t())  # not contiguous
    w = torch.nn.Parameter(bf16(8))
    assert not cpu_decode.usable(x, w)  # training: autograd needs PyTorch's operations
    with torch.no_grad():
        assert cpu_decode.usable(x, w)


def test_a_model_decodes_the_same_tokens_with_it(glm_dir, monkeypatch):
    calls = {"add_rms_norm": 0, "silu_mul": 0, "decode_attention": 0, "rope_and_cache": 0}
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(cpu_decode, name)):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(cpu_decode, name, counted)
    llm = LLM(str(glm_dir), dtype="bfloat16")
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["你好", "hello there, how are you", "1 2 3"]  # a batch: decode rows of several lengths
    with_c = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert all(calls.values()), calls
    monkeypatch.setattr(cpu_decode, "_cpu_decode", None)  # PyTorch's operations, as where it was not built
    assert not cpu_decode.usable(torch.zeros(1, dtype=torch.bfloat16))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == with_c
