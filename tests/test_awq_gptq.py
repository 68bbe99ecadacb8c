"""Asymmetric int4 (per-group offsets) and act-order in QuantLinear, and AutoAWQ / AutoGPTQ 4-bit checkpoints.

The checkpoints are packed here from the formats' documentation, independently of models/awq_gptq.py, and each
comes with the float checkpoint it stands for (its dequantized weights): the converted layers must dequantize to
exactly those weights, and the quantized model must decode like the float one.
"""

import pytest
import torch
import torch.nn.functional as F

from glmkit.models.quant import QuantLinear, dequantize, pack_int4


def asymmetric_layer(out_features, in_features, group, seed=0, bias=True, permuted=False):
    """A QuantLinear with random q, scales, offsets (and a permutation), and its float weight in x's order."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group
    q = torch.randint(-8, 8, (out_features, in_features), generator=g, dtype=torch.int8)
    scales = torch.rand(out_features, groups, generator=g) * 0.05 + 0.01
    offsets = torch.randn(out_features, groups, generator=g) * 0.1
    layer = QuantLinear(in_features, out_features, bias, 4, group, offsets=True, permuted=permuted)
    layer.qweight, layer.scales, layer.offsets = pack_int4(q), scales, offsets
    weight = dequantize(4, layer.qweight, scales, torch.float32, offsets)  # columns in the layer's order
    if permuted:
        layer.perm = torch.randperm(in_features, generator=g)
        weight = torch.empty_like(weight).index_copy_(1, layer.perm, weight)  # back to x's order
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features, generator=g), requires_grad=False)
    return layer, weight


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# -- offsets and act-order in QuantLinear ----------------------------------------------------------------

def test_offsets_dequantize_as_q_times_scale_plus_offset():
    q = torch.tensor([[-8, 7, 3, -1]], dtype=torch.int8)
    w = dequantize(4, pack_int4(q), torch.tensor([[0.5, 2.0]]), torch.float32, torch.tensor([[1.0, -1.0]]))
    assert w.tolist() == [[-3.0, 4.5, 5.0, -3.0]]


def test_symmetric_layers_have_no_offsets_buffer():
    layer = QuantLinear(64, 16, False, 4, 32)
    assert layer.offsets is None and layer.perm is None
    assert set(layer.state_dict()) == {"qweight", "scales"}
    assert "offsets" not in layer.extra_repr()
    asym = QuantLinear(64, 16, False, 4, 32, offsets=True, permuted=True)
    assert set(asym.state_dict()) == {"qweight", "scales", "offsets", "perm"}
    assert asym.offsets.shape == (16, 2) and "offsets, act-order" in asym.extra_repr()


@pytest.mark.parametrize("group,in_features", [(32, 128), (128, 256), (256, 256), (384, 384)])
@pytest.mark.parametrize("permuted", [False, True])
def test_cpu_kernel_adds_the_offsets(group, in_features, permuted):
    """PyTorch's CPU kernel computes (u - 8) * scale + zero per group: the offsets are its zeros. 40 rows: not a
    whole tile; group 384 (one per row) is repeated per 128 for the kernel, offsets with it."""
    layer, weight = asymmetric_layer(40, in_features, group, seed=group, permuted=permuted)
    x = torch.randn(5, in_features)
    expected = F.linear(x, weight, layer.bias)
    unpacked = layer(x)  # not prepared: dequantized per call, as training runs it
    assert rel_err(unpacked, expected) < 1e-5
    layer.prepare(torch.bfloat16)
    got = layer(x.to(torch.bfloat16).view(1, 5, in_features)).view(5, 40)
    assert rel_err(got, expected) < 0.02


def test_training_path_gives_the_input_its_gradient():
    layer, weight = asymmetric_layer(24, 64, 32, seed=3, bias=False, permuted=True)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, weight).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("group", [32, 64])
def test_cuda_path_adds_the_offsets(group):
    """QuantLinear's CUDA forward (the Triton kernel plus the offsets in torch), here under Triton's interpreter on
    CPU tensors (fp16: the interpreter mishandles bf16)."""
    from triton_kernels import DEVICE  # noqa: F401  (sets up the interpreter without CUDA)

    layer, weight = asymmetric_layer(48, 128, group, seed=11)
    layer = layer.to(DEVICE)
    x = torch.randn(3, 128).to(DEVICE)
    expected = F.linear(x, weight.to(DEVICE), layer.bias)
    layer.bias.data = layer.bias.data.half()
    layer._forward = layer._triton(torch.float16)
    assert layer.offsets.dtype == torch.float32 and layer.offsets.shape == (48, 128 // group)
    got = layer(x.half())
    assert got.dtype == torch.float16 and rel_err(got, expected) < 3e-3
