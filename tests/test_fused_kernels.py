"""The fused Triton kernels (kernels/fused.py) equal the PyTorch code they replace. Run under Triton's
interpreter without a GPU; skipped where triton is not installed."""

import pytest
import torch
import torch.nn.functional as F

from triton_kernels import DEVICE  # noqa: I001  (before any kernel: sets up the interpreter)
from glmkit.kernels.fused import add_rms_norm, rope_and_cache, silu_and_mul
from glmkit.models.config import ModelConfig
from glmkit.models.layers import Rotary


def test_add_rms_norm():
    torch.manual_seed(0)
    x, residual, w = torch.randn(3, 48, device=DEVICE), torch.randn(3, 48, device=DEVICE), torch.rand(48, device=DEVICE)
    expected_sum = x + residual
    expected = F.rms_norm(expected_sum, (48,), w, 1e-6)
    out, new_residual = add_rms_norm(x, residual.clone(), w, 1e-6)
    torch.testing.assert_close(new_residual, expected_sum)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out, same = add_rms_norm(x, None, w, 1e-6)
    assert same is x
    torch.testing.assert_close(out, F.rms_norm(x, (48,), w, 1e-6), rtol=1e-5, atol=1e-5)


def test_silu_and_mul():
    x = torch.randn(4, 2 * 1500, device=DEVICE)  # more than one column block
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(x), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary_dim,interleaved", [(16, True), (32, False), (24, True)])
def test_rope_and_cache(rotary_dim, interleaved):
    torch.manual_seed(0)
    heads, groups, dim = 6, 2, 32
    config = ModelConfig(family="glm", model_type="chatglm", vocab_size=8, hidden_size=64, num_layers=1,
                         num_heads=heads, num_kv_heads=groups, head_dim=dim, intermediate_size=8, rms_norm_eps=1e-5,
                         rope_theta=10000.0, rotary_dim=rotary_dim, rope_interleaved=interleaved, qkv_bias=False,
                         tie_word_embeddings=False, max_position_embeddings=64)
    rot = Rotary(config, torch.float32, torch.device(DEVICE))
    rot.ensure(64)
    qkv = torch.randn(5, heads + 2 * groups, dim, device=DEVICE)
    positions = torch.tensor([0, 3, 17, 63, 5], device=DEVICE)
    slots = torch.tensor([7, 0, 12, 3, 9], device=DEVICE)
    expected_qk = rot(qkv[:, : heads + groups], positions)
    expected_v = qkv[:, heads + groups:].clone()
    k_cache, v_cache = torch.zeros(16, groups, dim, device=DEVICE), torch.zeros(16, groups, dim, device=DEVICE)
    rope_and_cache(qkv, positions, rot.cos, rot.sin, interleaved, slots, k_cache, v_cache, heads, groups)
    torch.testing.assert_close(qkv[:, : heads + groups], expected_qk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, heads + groups:], expected_v)
    torch.testing.assert_close(k_cache[slots], expected_qk[:, heads:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache[slots], expected_v)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def test_pdl_is_off_off_hopper_and_when_asked(monkeypatch):
    """Programmatic dependent launch (kernels/pdl.py) only inside pdl.scope(True) (quantized models' decode graphs)
    or where GLMKIT_PDL asks for it, and only where it exists: a GPU of compute capability 9 or later, compiled
    code (not the interpreter)."""
    from glmkit.kernels import pdl

    cuda = torch.device("cuda")
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9  # else: the interpreter
    assert pdl.launch(torch.device("cpu"), "gemv") == {"PDL": False}
    monkeypatch.delenv("GLMKIT_PDL", raising=False)
    assert not pdl.enabled(cuda, "gemv")
    with pdl.scope(True):
        assert pdl.enabled(cuda, "gemv") == hopper
        with pdl.scope(False):
            assert not pdl.enabled(cuda, "gemv")
    assert not pdl.enabled(cuda, "gemv")
    monkeypatch.setenv("GLMKIT_PDL", "1")
    assert pdl.enabled(cuda, "gemv") == hopper
    monkeypatch.setenv("GLMKIT_PDL", "int4_gemv,paged_decode")
    assert pdl.enabled(cuda, "int4_gemv") == hopper and not pdl.enabled(cuda, "gemv")
    monkeypatch.setenv("GLMKIT_PDL", "0")
    with pdl.scope(True):
        assert not pdl.enabled(cuda, "gemv")
