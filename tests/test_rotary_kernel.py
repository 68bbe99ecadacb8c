"""The Triton rotary kernel equals the PyTorch rotary of models/layers.py (runs under Triton's interpreter without
a GPU; skipped where triton is not installed)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from glmkit.kernels.rotary import rotary_inplace  # noqa: E402
from glmkit.models.config import ModelConfig  # noqa: E402
from glmkit.models.layers import Rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def config(rotary_dim: int, interleaved: bool) -> ModelConfig:
    return ModelConfig(family="glm", model_type="chatglm", vocab_size=8, hidden_size=64, num_layers=1, num_heads=6,
                       num_kv_heads=2, head_dim=32, intermediate_size=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                       rotary_dim=rotary_dim, rope_interleaved=interleaved, qkv_bias=False,
                       tie_word_embeddings=False, max_position_embeddings=64)


@pytest.mark.parametrize("rotary_dim,interleaved", [(16, True), (32, False), (24, True)])
def test_rotary_kernel_matches_torch(rotary_dim, interleaved):
    torch.manual_seed(0)
    rot = Rotary(config(rotary_dim, interleaved), torch.float32, torch.device(DEVICE))
    rot.ensure(64)
    qkv = torch.randn(5, 10, 32, device=DEVICE)  # 6 query + 2 key heads rotated, 2 value heads untouched
    positions = torch.tensor([0, 3, 17, 63, 5], device=DEVICE)
    expected = rot(qkv[:, :8], positions)
    values = qkv[:, 8:].clone()
    rotary_inplace(qkv[:, :8], positions, rot.cos, rot.sin, interleaved)
    torch.testing.assert_close(qkv[:, :8], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, 8:], values)
