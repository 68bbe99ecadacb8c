"""The single-row GEMV kernel (kernels/gemv.py) against x.float() @ weight.float().T, and the decoder's Linear
routing batch-1 rows to it on CUDA. Under Triton's interpreter without a GPU (fp16 there: the interpreter
mishandles bf16); on a GPU in bf16 and fp16, plus a CUDA-graph capture."""

import pytest
import torch

from triton_kernels import CUDA, DEVICE  # noqa: I001  (before any kernel: sets up the interpreter)
from glmkit.kernels.gemv import config, gemv
from glmkit.models.layers import Linear

DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


def reference(x, w, b=None):
    y = x.float() @ w.float().t()
    return y + b.float() if b is not None else y


def assert_near(out, ref, dtype):
    # fp32 accumulation; the only rounding is the output's (and the order of the sums)
    tol = (4e-3 if dtype == torch.float16 else 2e-2) * ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", DTYPES)
# many short rows: 16384 on a GPU; under the interpreter (100 s for 16384 on 2 cores) enough rows for many programs
@pytest.mark.parametrize("N,K", [(64, 256), (70, 200), (16384 if CUDA else 1040, 48), (20, 3000)])
def test_gemv_matches_reference(N, K, dtype):
    gen = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=gen).to(dtype).to(DEVICE)
    x = torch.randn(1, K, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=gen).to(dtype).to(DEVICE)
    assert_near(gemv(x, w), reference(x, w), dtype)
    out = gemv(x, w, b)
    assert out.shape == (1, N) and out.dtype == dtype
    assert_near(out, reference(x, w, b), dtype)


@pytest.mark.parametrize("tiles", [(4, 64, True, 4), (8, 32, False, 2), (2, 128, False, 8)])
def test_other_tilings_agree(tiles):
    """Both reductions (once at the end, or per step) and other tile shapes, as the benchmark's sweep tries them."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(70, 200, generator=gen).half().to(DEVICE)
    x = torch.randn(1, 200, generator=gen).half().to(DEVICE)
    assert_near(gemv(x, w, tiles=tiles), reference(x, w), torch.float16)


def test_config_fits_the_shape():
    assert config(27392, 4096) == (2, 2048, False, 8)
    assert config(64, 48)[1] == 64  # short K: one tile


def test_gemv_rejects_bad_shapes():
    w = torch.zeros(8, 32, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="x \\[1, 32\\]"):
        gemv(torch.zeros(2, 32, dtype=torch.float16, device=DEVICE), w)
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.zeros(1, 8, dtype=torch.float16, device=DEVICE), w.t())


def test_strided_x():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=gen).half().to(DEVICE)
    wide = torch.randn(1, 128, generator=gen).half().to(DEVICE)
    x = wide[:, ::2]  # non-unit stride along K
    assert_near(gemv(x, w), reference(x, w), torch.float16)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_routes_single_rows(dtype):
    torch.manual_seed(0)
    layer = Linear(512, 300, bias=True).to("cuda", dtype)
    x1, x4 = torch.randn(1, 512, device="cuda", dtype=dtype), torch.randn(4, 512, device="cuda", dtype=dtype)
    ref = torch.nn.functional.linear
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x1).float(), ref(x1, layer.weight, layer.bias).float(), rtol=tol, atol=tol)
    torch.testing.assert_close(layer(x4).float(), ref(x4, layer.weight, layer.bias).float(), rtol=tol, atol=tol)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.gpu
def test_gemv_in_cuda_graph():
    w = torch.randn(4608, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    gemv(x, w)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_near(out, reference(x, w), torch.bfloat16)
