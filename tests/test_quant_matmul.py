"""Weight-only quantized matmul (Triton) against x.float() @ dequantize(weight).T.

Without CUDA the kernel runs under Triton's interpreter on CPU tensors, so the sizes stay tiny and the activations
are fp16 (the interpreter mishandles bf16); with CUDA the same tests run on the GPU in bf16 too, plus a CUDA-graph
capture test and QuantLinear's own CUDA path.
"""

import pytest
import torch

from triton_kernels import CUDA, DEVICE  # noqa: I001  (before any kernel: sets up the interpreter)
from glmkit.kernels.quant_matmul import QuantMatmul
from glmkit.models.quant import dequantize, quantize

DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]
# Largest error allowed, as a fraction of the largest reference value: the output's rounding plus (multi-group
# int4) the scales and dequantized weights held in the activation dtype; accumulation is fp32.
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
QUANT = [(8, None), (4, 32), (4, "K")]  # "K": one group per row, as ChatGLM's own int4 checkpoints


def make(bits, group, N, K, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    group_size = K if group in (None, "K") else group
    qweight, scales = quantize(bits, w, group_size)
    return qweight.to(DEVICE), scales.to(DEVICE), group_size, dequantize(bits, qweight, scales).to(DEVICE)


def rand_x(M, K, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=gen).to(dtype).to(DEVICE)


def check(y, x, w_ref, dtype, bias=None):
    assert y.dtype == dtype and y.shape == (x.shape[0], w_ref.shape[0])
    ref = x.float() @ w_ref.T + (0 if bias is None else bias.float())
    assert torch.isfinite(y).all()
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K", [(48, 128), (80, 96)])  # odd tile counts; K = 96 is padded to the K tile
@pytest.mark.parametrize("M", [1, 5, 33, 600])  # 600: from QuantMatmul.DEQUANT_ROWS on, dequantize + cuBLAS
@pytest.mark.parametrize("bits,group", QUANT)
def test_matches_dequantized_reference(bits, group, M, N, K, dtype):
    qweight, scales, group_size, w_ref = make(bits, group, N, K)
    mm = QuantMatmul(bits, qweight, scales, group_size, dtype)
    x = rand_x(M, K, dtype)
    check(mm(x), x, w_ref, dtype)


@pytest.mark.parametrize("tiles", [(16, 32, 2), (4, 128, 2), (32, 256, 8)])  # K tile larger than a row: masked
@pytest.mark.parametrize("N,K", [(48, 256), (80, 96), (40, 320)])
@pytest.mark.parametrize("bits,group", QUANT + [(4, 64)])
def test_single_row_kernel_matches_dequantized_reference(bits, group, N, K, tiles):
    if group == 64 and K % 64:
        pytest.skip("groups of 64 do not divide K")
    qweight, scales, group_size, w_ref = make(bits, group, N, K, seed=6)
    mm = QuantMatmul(bits, qweight, scales, group_size, DTYPES[-1])
    if bits == 4 and tiles[1] < mm.block_k // 2:
        pytest.skip("the byte tile must hold whole int4 segments")
    mm.gemv_tiles = tiles
    x = rand_x(1, K, DTYPES[-1], seed=7)
    check(mm(x), x, w_ref, DTYPES[-1])


@pytest.mark.parametrize("M", [3, 40])
@pytest.mark.parametrize("bits,group", QUANT + [(4, 64), (4, 16)])
def test_split_k_is_right_and_deterministic(bits, group, M):
    N, K, dtype = 80, 512, DTYPES[-1]
    qweight, scales, group_size, w_ref = make(bits, group, N, K, seed=3)
    mm = QuantMatmul(bits, qweight, scales, group_size, dtype)
    block_m = 16 if M <= 16 else 64
    mm._configs[M] = (block_m, 64, mm.block_k, 4, 4, 3)  # force a split on these tiny shapes
    x = rand_x(M, K, dtype, seed=4)
    first, second = mm(x), mm(x)  # the second call finds the arrival counters reset by the first
    check(first, x, w_ref, dtype)
    assert torch.equal(first, second)
    assert int(mm._counters.abs().sum()) == 0
    x2 = rand_x(M, K, dtype, seed=5)
    check(mm(x2), x2, w_ref, dtype)


@pytest.mark.parametrize("path", ["single-row", "tiled", "split-k", "dequantized", "dequantized-in-parts"])
@pytest.mark.parametrize("bits,group", QUANT + [(4, 16)])
def test_bias_on_every_path(bits, group, path):
    N, K, dtype = 80, 256, DTYPES[-1]
    qweight, scales, group_size, w_ref = make(bits, group, N, K, seed=13)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    mm = QuantMatmul(bits, qweight, scales, group_size, dtype, bias=bias)
    M = 1 if path == "single-row" else 7
    if path == "split-k":
        mm._configs[M] = (16, 64, mm.block_k, 4, 4, 3)
    if path.startswith("dequantized"):
        mm.dequant_rows = M
    if path == "dequantized-in-parts":
        mm.DEQUANT_SCRATCH = 64 * 2 * K  # 64 weight rows at a time: two parts
    x = rand_x(M, K, dtype, seed=15)
    check(mm(x), x, w_ref, dtype, bias)


def test_strided_rows_and_empty_input():
    qweight, scales, group_size, w_ref = make(4, 32, 48, 64)
    mm = QuantMatmul(4, qweight, scales, group_size, torch.float16)
    wide = rand_x(5, 100, torch.float16)
    x = wide[:, :64]  # row stride 100
    check(mm(x), x, w_ref, torch.float16)
    assert mm(rand_x(0, 64, torch.float16)).shape == (0, 48)


def test_single_row_int4_tile_must_give_each_thread_two_words():
    qweight, scales, group_size, _ = make(4, 32, 16, 64)
    mm = QuantMatmul(4, qweight, scales, group_size, DTYPES[-1])
    mm.gemv_tiles = (16, 32, 4)  # 16 rows x 8 words over 128 threads
    with pytest.raises(ValueError, match="two words"):
        mm(rand_x(1, 64, DTYPES[-1]))


def test_rejects_bad_shapes():
    qweight, scales, _, _ = make(4, 8, 16, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        QuantMatmul(4, qweight, scales, 8, torch.float16)
    qweight, scales, group_size, _ = make(8, None, 16, 64)
    mm = QuantMatmul(8, qweight, scales, group_size, torch.float16)
    with pytest.raises(ValueError, match="columns"):
        mm(rand_x(2, 32, torch.float16))


def test_config_depends_on_m_only():
    qweight, scales, group_size, _ = make(4, 32, 48, 128)
    mm = QuantMatmul(4, qweight, scales, group_size, torch.float16)
    assert mm.config(1)[0] == mm.config(16)[0] == 16
    assert mm.config(17)[0] == 32 and mm.config(64)[0] == 64 and mm.config(200)[0] in (64, 128)
    assert mm.config(200)[3] == 1  # split-K only while one row of tiles covers M
    assert mm.config(5) is mm.config(5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bits,group", QUANT)
def test_cuda_graph_capture(bits, group):
    N, K, dtype = 256, 2048, torch.bfloat16
    qweight, scales, group_size, w_ref = make(bits, group, N, K, seed=7)
    mm = QuantMatmul(bits, qweight, scales, group_size, dtype)
    assert mm.config(4)[3] > 1  # the split-K path is the one captured
    static_x = rand_x(4, K, dtype, seed=8)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        mm(static_x)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = mm(static_x)
    for seed in (9, 10):
        x = rand_x(4, K, dtype, seed=seed)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        check(static_y, x, w_ref, dtype)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("bits,group", QUANT)
def test_quant_linear_cuda_path(bits, group):
    from glmkit.models.quant import QuantLinear

    N, K, dtype = 96, 256, torch.bfloat16
    qweight, scales, group_size, w_ref = make(bits, group, N, K, seed=11)
    layer = QuantLinear(K, N, True, bits, group_size)
    layer.qweight, layer.scales = qweight, scales
    layer.bias = torch.nn.Parameter(torch.randn(N, device=DEVICE))
    layer.prepare(dtype)
    x = rand_x(6, K, dtype, seed=12).view(2, 3, K)
    y = layer(x)
    assert y.shape == (2, 3, N)
    check((y - layer.bias).view(6, N), x.view(6, K), w_ref, dtype)
