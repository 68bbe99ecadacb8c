"""int8 x int8 products (int8a8 on a GPU: kernels/int8_matmul.py, through QuantMatmul) against references built
here: each row rounded to int8 on its own range in torch, times the dequantized weight, in fp32.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (tiny sizes, fp16); with CUDA the same
tests run on the GPU in bf16 too, plus a CUDA-graph capture test.
"""

import pytest
import torch

from triton_kernels import CUDA, DEVICE  # noqa: I001  (before any kernel: sets up the interpreter)
from glmkit.kernels import int8_matmul
from glmkit.kernels.quant_matmul import QuantMatmul
from glmkit.models.quant import dequantize, quantize

DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]
OUT_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # the output's one rounding, as a fraction of its largest


def rounded(x: torch.Tensor, halves: int) -> torch.Tensor:
    """x as the kernel sees it: each row mid + step * a, a in [-127, 127] over the row's range, rounded half up
    (twice: the rounding error too)."""
    left, total = x.float(), torch.zeros_like(x, dtype=torch.float32)
    for _ in range(halves):
        hi, lo = left.amax(1, keepdim=True), left.amin(1, keepdim=True)
        mid, step = (hi + lo) * 0.5, (hi - lo) / 254
        inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
        part = mid + (torch.floor((left - mid) * inv + 128.5) - 128) * step
        total, left = total + part, left - part
    return total


def layer(N, K, seed=0, bias=False, halves=1, dtype=DTYPES[-1]):
    gen = torch.Generator().manual_seed(seed)
    qweight, scales = quantize(8, torch.randn(N, K, generator=gen), K)
    b = torch.randn(N, generator=gen).to(DEVICE) if bias else None
    mm = QuantMatmul(8, qweight.to(DEVICE), scales.to(DEVICE), K, dtype, bias=b, int8_activations=halves)
    return mm, dequantize(8, qweight, scales).to(DEVICE), b


def rand_x(M, K, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    x[:, 0] *= 20  # an outlier column, as real activations have
    return x.to(dtype).to(DEVICE)


def check(y, x, w, halves, bias=None):
    ref = rounded(x, halves) @ w.T + (0 if bias is None else bias.float())
    assert y.shape == ref.shape and torch.isfinite(y).all()
    err = (y.float() - ref).abs().max().item()
    assert err <= OUT_TOL[y.dtype] * ref.abs().max().item(), err
    return ref


def test_rows_are_quantized_on_their_own_range():
    x = rand_x(6, 200, torch.float16, seed=3) + 3  # rows far from centred on zero
    x[2] = 0  # a constant row: step 0, no division by zero
    q, s = int8_matmul.quantize_rows(x, 256, halves=2)
    assert q.shape == (2, 6, 256) and s.shape == (2, 2, 6)
    assert not q[:, :, 200:].any()  # the padding the weight has is zero here
    assert s[0, 0, 2] == 0 and not q[:, 2].any()
    xf = x.float()
    hi, lo = xf.amax(1), xf.amin(1)
    torch.testing.assert_close(s[0, 0], (hi - lo) / 254)
    torch.testing.assert_close(s[0, 1], (hi + lo) / 2)
    assert q[0].amax(1).tolist() == [127, 127, 0, 127, 127, 127] and q[0].amin(1)[0] == -127  # the whole range
    first = s[0, 1, :, None] + q[0, :, :200].float() * s[0, 0, :, None]
    assert ((first - xf).abs() <= s[0, 0, :, None] * 0.5001).all()  # within half a step of x
    both = first + s[1, 1, :, None] + q[1, :, :200].float() * s[1, 0, :, None]
    assert (both - xf).abs().max() < (first - xf).abs().max() / 50  # the second half refines


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("halves", [1, 2])
@pytest.mark.parametrize("M", [2, 5, 33, 600])  # 600: int8 activations never take the dequantizing path
@pytest.mark.parametrize("N,K", [(48, 128), (80, 96)])  # K = 96: padded to the K tile, x's padding zero
def test_matches_rounded_reference(N, K, M, halves, dtype):
    mm, w, _ = layer(N, K, halves=halves, dtype=dtype)
    x = rand_x(M, K, dtype)
    check(mm(x), x, w, halves)


def test_two_halves_are_nearly_exact_and_one_is_not():
    mm1, w, _ = layer(64, 256, seed=4, halves=1)
    mm2, _, _ = layer(64, 256, seed=4, halves=2)
    x = rand_x(9, 256, DTYPES[-1], seed=5)
    exact = x.float() @ w.T
    err1 = (mm1(x).float() - exact).abs().max().item()
    err2 = (mm2(x).float() - exact).abs().max().item()
    assert err2 < err1 / 2, (err1, err2)


def test_one_row_stays_on_the_bf16_single_row_kernel():
    mm, w, _ = layer(48, 128, seed=6)
    x = rand_x(1, 128, DTYPES[-1], seed=7)
    exact = x.float() @ w.T
    assert (mm(x).float() - exact).abs().max() <= OUT_TOL[x.dtype] * exact.abs().max()


@pytest.mark.parametrize("halves", [1, 2])
def test_split_k_bias_and_determinism(halves):
    mm, w, bias = layer(80, 4096, seed=8, bias=True, halves=halves)
    M = 3
    cfg = int8_matmul.config(M, mm.N, mm.k_pad // mm.block_k, mm.num_sms, mm._counters.numel())
    assert cfg[2] > 1  # 80 outputs cannot fill the GPU: K is split
    x = rand_x(M, 4096, DTYPES[-1], seed=9)
    first, second = mm(x), mm(x)  # the second call finds the arrival counters reset by the first
    check(first, x, w, halves, bias)
    assert torch.equal(first, second)
    assert int(mm._counters.abs().sum()) == 0


def test_config_follows_the_shapes():
    sms = 132
    assert int8_matmul.config(4, 27392, 32, sms, 264)[:3] == (16, 64, 1)  # enough output tiles
    assert int8_matmul.config(64, 4096, 107, sms, 264)[2] == 4  # few tiles, a long K: split
    assert int8_matmul.config(64, 4096, 8, sms, 264)[2] == 1  # K too short to split
    assert int8_matmul.config(256, 27392, 32, sms, 264)[:2] == (128, 128)
    assert int8_matmul.config(256, 4096, 32, sms, 264)[0] == 64
    for M in (2, 16, 17, 64, 65, 256, 2048):
        block_m, block_n, split, warps, stages = int8_matmul.config(M, 4608, 32, sms, 264)
        assert split == 1 or split * M * 4608 * 4 <= int8_matmul.MAX_SCRATCH
        assert split <= int8_matmul.MAX_SPLIT_K and warps in (4, 8)


def test_refuses_int8_activations_with_int4_weights():
    qweight, scales = quantize(4, torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match="int8_activations"):
        QuantMatmul(4, qweight, scales, 32, torch.float16, int8_activations=1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("halves", [1, 2])
def test_cuda_graph_capture(halves):
    mm, w, bias = layer(256, 2048, seed=10, bias=True, halves=halves, dtype=torch.bfloat16)
    static_x = rand_x(4, 2048, torch.bfloat16, seed=11)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mm(static_x)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = mm(static_x)
    for seed in (12, 13):
        x = rand_x(4, 2048, torch.bfloat16, seed=seed)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        check(static_y, x, w, halves, bias)
