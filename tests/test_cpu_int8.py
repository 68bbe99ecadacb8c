"""CPU int8 with int8 activations (models/cpu_int8.py): glmkit's own kernel (kernels/cpu_int8.c) and fbgemm's
dynamic quantized linear on glmkit's int8 layout, against the float product of the dequantized weight (and, for
glmkit's, against the exact integer arithmetic it promises), per-row activation ranges, and a whole model switched
to it."""

import os

import pytest
import torch

from checkpoint_fixtures import llama_config, make_hf_dir, random_llama_state
from glmkit import LLM, SamplingParams
from glmkit.models import cpu_int8
from glmkit.models.cpu_int8 import DynamicInt8Linear, cpu_has_vnni, runs_here, use_int8_activations
from glmkit.models.quant import QuantLinear, dequantize, quantize_int8

pytestmark = pytest.mark.skipif(not runs_here(), reason="neither glmkit's kernel nor fbgemm runs here")
PROMPT = [5, 17, 33, 64, 101, 7, 250, 3, 90, 44, 12]
HERE = [k for k, runs in (("glmkit", cpu_int8.own_kernel_available()),
                          ("fbgemm", cpu_int8.fbgemm_available() and "avx2" in cpu_int8.cpu_flags())) if runs]
kernels = pytest.mark.parametrize("kernel", HERE)
# glmkit's kernel on each instruction set this CPU runs (AVX2, AVX-VNNI, AVX512-VNNI): the same integer sums
ISAS = cpu_int8.own_kernel_isas()
isas = pytest.mark.parametrize("isa", ISAS or [pytest.param(None, marks=pytest.mark.skip("glmkit's kernel not built"))])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def int8_weight(out_features: int, in_features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return quantize_int8(torch.randn(out_features, in_features, generator=g) * 0.05)


def test_the_default_kernel_is_glmkits_where_it_was_built():
    assert cpu_int8.default_kernel() == ("glmkit" if "glmkit" in HERE else "fbgemm")


# 8-bit activations saturate fbgemm's int16 pair sums on a CPU without VNNI: there only reduce_range is right;
# glmkit's kernel runs 8 bits on any AVX2 CPU
@pytest.mark.parametrize("kernel, reduce_range", [
    pytest.param("fbgemm", False, marks=pytest.mark.skipif(
        "fbgemm" not in HERE or not cpu_has_vnni(), reason="fbgemm's 8-bit activations need VNNI")),
    pytest.param("fbgemm", True, marks=pytest.mark.skipif("fbgemm" not in HERE, reason="no fbgemm")),
    pytest.param("glmkit", False, marks=pytest.mark.skipif("glmkit" not in HERE, reason="glmkit's kernel not built"))])
@pytest.mark.parametrize("rows", [1, 5])
def test_matches_the_dequantized_weight(rows, kernel, reduce_range):
    qweight, scales = int8_weight(96, 160)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(1))
    ref = x @ dequantize(8, qweight, scales).T
    got = DynamicInt8Linear(qweight, scales, reduce_range=reduce_range, kernel=kernel)(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # 8-bit activations: about 1% of the product's norm on Gaussian inputs; two 7-bit passes: about 14 bits
    # (one 7-bit pass alone would be about 2%)
    assert rel_err(got, ref) < (0.001 if reduce_range else 0.01)


@pytest.mark.skipif("fbgemm" not in HERE, reason="no fbgemm")
def test_two_passes_on_a_prompt_with_an_outlier_row():
    """reduce_range's two passes: each row's error is that of 14-bit activations, whatever the rows beside it."""
    qweight, scales = int8_weight(64, 256, seed=13)
    w = dequantize(8, qweight, scales)
    linear = DynamicInt8Linear(qweight, scales, reduce_range=True, kernel="fbgemm")
    g = torch.Generator().manual_seed(14)
    x = torch.randn(7, 256, generator=g)
    x[1] *= 500
    x[4, 3] = 80.0  # one outlier channel: a 7-bit step would be about 1.3% of it
    x[6] = 0.25  # a constant row: its span is zero
    got = linear(x)
    for i in range(7):
        assert rel_err(got[i], x[i] @ w.T) < 0.001
        assert torch.equal(linear(x[i:i + 1]), got[i:i + 1])


@kernels
def test_output_dtype_follows_the_input_unless_fixed(kernel):
    qweight, scales = int8_weight(32, 64)
    x = torch.randn(3, 64).bfloat16()
    assert DynamicInt8Linear(qweight, scales, kernel=kernel)(x).dtype == torch.bfloat16
    assert DynamicInt8Linear(qweight, scales, out_dtype=torch.float32, kernel=kernel)(x).dtype == torch.float32


@kernels
def test_each_row_is_quantized_on_its_own_range(kernel):
    """One row a thousand times larger (an outlier token in a prompt) leaves the others' error as it is alone."""
    qweight, scales = int8_weight(64, 128, seed=2)
    linear = DynamicInt8Linear(qweight, scales, kernel=kernel)
    w = dequantize(8, qweight, scales)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    x[0] *= 1000
    got = linear(x)
    for i in range(4):
        alone = linear(x[i:i + 1])
        assert rel_err(got[i], x[i] @ w.T) < 0.01
        assert rel_err(got[i], alone[0]) < 0.01


def test_smoothed_linears_after_a_norm_on_request(tmp_path, hf_tokenizer_dir):
    config = llama_config(512, "qwen2")
    d = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=4), config, hf_tokenizer_dir)
    llm = LLM(str(d), device="cpu", quantization="int8", enable_prefix_caching=False)
    assert use_int8_activations(llm.model, keep=(), smooth=("attn.qkv", "mlp.gate_up")) == \
        4 * config["num_hidden_layers"] + 1
    layer = llm.model.layers[0]
    assert layer.attn.qkv._forward.inverse_input_scales is not None
    assert layer.mlp.gate_up._forward.inverse_input_scales is not None
    assert layer.mlp.down._forward.inverse_input_scales is None  # no norm right before it
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


@kernels
def test_smoothing_computes_the_same_product(kernel):
    """Input channel j divided by s[j], weight column j multiplied by it: x @ W.T again, one int8 rounding more."""
    qweight, scales = int8_weight(64, 96, seed=7)
    g = torch.Generator().manual_seed(8)
    input_scales = torch.rand(96, generator=g) * 20 + 0.05  # as an RMSNorm's weight: some channels far larger
    x = torch.randn(3, 96, generator=g) * input_scales  # ... and so are those channels of its output
    ref = x @ dequantize(8, qweight, scales).T
    smoothed = DynamicInt8Linear.smoothed(qweight, scales, input_scales, kernel=kernel)
    # Whether it beats the plain product depends on the model's weights (on random ones it is a wash); on the
    # default model it is measured in benchmarks/perplexity.py. Here: the same product within int8 error.
    assert rel_err(smoothed(x), ref) < 0.02
    assert smoothed.unpack()[0].shape == qweight.shape


@kernels
def test_unpack_gives_the_weight_back(kernel):
    qweight, scales = int8_weight(48, 80, seed=5)
    back_q, back_scales = DynamicInt8Linear(qweight, scales, kernel=kernel).unpack()
    assert torch.equal(back_q, qweight)
    torch.testing.assert_close(back_scales, scales.float())


@kernels
def test_a_model_switched_to_int8_activations_generates_as_int8(tmp_path, hf_tokenizer_dir, kernel):
    config = llama_config(512, "qwen2")
    d = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=4), config, hf_tokenizer_dir)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    w8a16 = LLM(str(d), device="cpu", quantization="int8", enable_prefix_caching=False)
    w8a8 = LLM(str(d), device="cpu", quantization="int8", enable_prefix_caching=False)
    layers = config["num_hidden_layers"]
    layer = w8a8.model.layers[0]
    if kernel == "glmkit":  # every linear; qkv refined (two 8-bit halves per row)
        assert use_int8_activations(w8a8.model, kernel=kernel) == 4 * layers + 1
        assert layer.attn.qkv._forward.refine and not layer.mlp.down._forward.refine
    else:  # o, gate_up, down per layer, and the head; qkv kept at bf16 activations
        assert use_int8_activations(w8a8.model, kernel=kernel) == 3 * layers + 1
        assert not isinstance(layer.attn.qkv._forward, DynamicInt8Linear)
    assert all(isinstance(m._forward, DynamicInt8Linear) and m._forward.kernel == kernel
               for m in (layer.attn.o, layer.mlp.gate_up, layer.mlp.down, w8a8.model.lm_head))
    assert layer.mlp.gate_up._forward.inverse_input_scales is None  # smoothing is opt-in
    assert all(m.qweight.numel() == 0 for m in w8a8.model.modules()  # the kernel's copy replaces the bytes
               if isinstance(m, QuantLinear) and isinstance(m._forward, DynamicInt8Linear))
    with torch.inference_mode():
        hidden = torch.randn(6, config["hidden_size"], generator=torch.Generator().manual_seed(6)).bfloat16()
        ref, got = w8a16.model.compute_logits(hidden), w8a8.model.compute_logits(hidden)
    assert got.dtype == torch.float32 and rel_err(got, ref) < 0.02
    # a prompt (several rows per product) and decode steps (one row) both run; greedy text of a random model
    # may differ from bf16 activations' after a near tie, so only the shape is checked here
    out = w8a8.generate([PROMPT, PROMPT[:5]], params)
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]


def test_switching_before_prepare_uses_the_fp32_scales_and_gives_the_bias_the_dtype():
    from torch import nn

    qweight, scales = int8_weight(40, 64, seed=9)
    model = nn.Module()
    model.o = QuantLinear(64, 40, bias=True, bits=8, group_size=64)
    model.o.qweight.copy_(qweight)
    model.o.scales.copy_(scales)
    model.o.bias.data = torch.linspace(-1, 1, 40)
    assert use_int8_activations(model, torch.bfloat16) == 1
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        y = model.o(x.bfloat16())
    assert y.dtype == torch.bfloat16 and model.o.bias.dtype == torch.bfloat16
    assert rel_err(y.float(), x @ dequantize(8, qweight, scales).T + torch.linspace(-1, 1, 40)) < 0.02
    assert use_int8_activations(model, torch.bfloat16) == 0  # already switched


@kernels
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(kernel):
    qweight, scales = int8_weight(48, 64, seed=11)
    linear = DynamicInt8Linear(qweight, scales.float(), kernel=kernel)
    g = torch.Generator().manual_seed(12)
    rows = torch.randn(5, 64, generator=g)
    rows[2] *= 40  # an outlier row
    rows[3] = rows[3].abs()  # a row with no negative values: alone its own range would be [0, peak]
    together = linear(rows)
    for i in range(5):
        assert torch.equal(linear(rows[i:i + 1]), together[i:i + 1])
        assert torch.equal(linear(rows[i:]), together[i:])


def exact_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What glmkit's kernel promises (kernels/cpu_int8.c), computed apart: each row quantized to 8 bits centred on
    its range (ties to even), integer sums exact, then step * scale * sum + mid * (W @ 1) in fp32."""
    x = x.float()
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    mid, half = (low + high) * 0.5, (high - low) * 0.5
    # 127 / half as one fp32 division (a Python number over a tensor is its reciprocal times 127: 1 ulp off)
    inv = torch.where(half > 0, torch.full_like(half, 127.0).div(half), torch.zeros_like(half))
    a = ((x - mid) * inv).clamp(-127, 127).round()
    sums = (a.double() @ qweight.double().T).float()  # exact: far below 2**24 per sum
    row_sums = (qweight.to(torch.int64).sum(dim=1).double() * scales.double()).float()
    return sums * ((half / 127.0) * scales[None, :]) + mid * row_sums[None, :]


@isas
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 8, 32),  # one tile
    (3, 10, 70),  # rows not a multiple of 4, columns not of 64: the padding
    (70, 37, 4864),  # more rows than one block of 64, a remainder of 2 and 6 rows after passes of 4; MLP width
])
def test_glmkits_kernel_computes_exactly_its_integer_arithmetic(rows, out_features, in_features, dtype, isa):
    qweight, scales = int8_weight(out_features, in_features, seed=rows)
    qweight[0] = 127
    qweight[1, ::2] = -127  # the widest pair sums: 2 * 127 * 127 must not saturate
    g = torch.Generator().manual_seed(20 + rows)
    x = (torch.randn(rows, in_features, generator=g) * 3 + 0.5).to(dtype)
    x[0, : in_features // 2] = x[0].abs().max()  # a run of the row's peak: a = 127 against q = 127
    if rows > 2:
        x[2] = 0.75  # a constant row: step 0, the product is its mid times W @ 1
    got = DynamicInt8Linear(qweight, scales, out_dtype=torch.float32, kernel="glmkit", isa=isa)(x)
    torch.testing.assert_close(got, exact_reference(x, qweight, scales), rtol=2e-6, atol=2e-6)
    ref = x.float() @ dequantize(8, qweight, scales).T
    assert rel_err(got, ref) < 0.01
    bf16 = DynamicInt8Linear(qweight, scales, kernel="glmkit", isa=isa)(x)
    assert bf16.dtype == dtype
    torch.testing.assert_close(bf16, got.to(dtype), rtol=0, atol=0)  # rounded once, to nearest even


@isas
def test_glmkits_kernel_uses_torchs_thread_count(isa):
    """The kernel splits the rows over torch.get_num_threads() OpenMP threads: the same numbers for any count."""
    qweight, scales = int8_weight(300, 256, seed=30)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(31))
    linear = DynamicInt8Linear(qweight, scales, kernel="glmkit", isa=isa)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(linear(x))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU runs glmkit's kernel on one instruction set")
@pytest.mark.parametrize("rows", [1, 7, 70])
def test_every_instruction_set_gives_the_same_numbers(rows):
    """The VNNI sets take a + 128 unsigned and subtract 128 * (the weight row's sum): the integer sums, and so the
    answers, are those of AVX2's signed products, bit for bit."""
    qweight, scales = int8_weight(70, 900, seed=50)
    x = torch.randn(rows, 900, generator=torch.Generator().manual_seed(51)).bfloat16()
    results = [DynamicInt8Linear(qweight, scales, kernel="glmkit", isa=isa, refine=refine)(x)
               for refine in (False, True) for isa in ISAS]
    half = len(ISAS)
    for group in (results[:half], results[half:]):
        assert all(torch.equal(group[0], r) for r in group[1:])


def refined_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """refine=True: the row's 8-bit rounding and then the error left, x - (mid + step * a), as a row of its own."""
    x = x.float()
    low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    mid, half = (low + high) * 0.5, (high - low) * 0.5
    inv = torch.where(half > 0, torch.full_like(half, 127.0).div(half), torch.zeros_like(half))
    a = ((x - mid) * inv).clamp(-127, 127).round()
    rest = x - (mid + (half / 127.0) * a)
    return exact_reference(x, qweight, scales), exact_reference(rest, qweight, scales)


@isas
@pytest.mark.parametrize("rows", [1, 33])  # 33: two refined rows per pass, 66 halves over two blocks of 64
def test_refined_rows_reach_about_16_bits(rows, isa):
    qweight, scales = int8_weight(40, 200, seed=40)
    x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(41)).bfloat16()
    ref = x.float() @ dequantize(8, qweight, scales).T
    one = DynamicInt8Linear(qweight, scales, out_dtype=torch.float32, kernel="glmkit", isa=isa)(x)
    refined = DynamicInt8Linear(qweight, scales, out_dtype=torch.float32, kernel="glmkit", isa=isa, refine=True)(x)
    first, second = refined_reference(x, qweight, scales)
    torch.testing.assert_close(refined, first + second, rtol=1e-5, atol=1e-5)
    assert rel_err(refined, ref) < rel_err(one, ref) / 50  # 8 more bits: about 1/127 of the error
    for i in range(rows):  # a row's numbers do not depend on the rows beside it
        assert torch.equal(refined[i], DynamicInt8Linear(qweight, scales, out_dtype=torch.float32, kernel="glmkit",
                                                         isa=isa, refine=True)(x[i:i + 1])[0])
    with pytest.raises(ValueError, match="refine=True"):
        DynamicInt8Linear(qweight, scales, kernel="fbgemm", refine=True)


def test_the_kernel_named_must_run_here(monkeypatch):
    qweight, scales = int8_weight(8, 32)
    with pytest.raises(ValueError, match="kernel='cuda'"):
        DynamicInt8Linear(qweight, scales, kernel="cuda")
    monkeypatch.setenv("GLMKIT_INT8_KERNEL", "fast")
    with pytest.raises(ValueError, match="GLMKIT_INT8_KERNEL='fast': must be one of glmkit, fbgemm"):
        DynamicInt8Linear(qweight, scales)
    monkeypatch.setenv("GLMKIT_INT8_KERNEL", "fbgemm")
    assert DynamicInt8Linear(qweight, scales).kernel == "fbgemm"
    monkeypatch.delenv("GLMKIT_INT8_KERNEL")
    monkeypatch.setattr(cpu_int8, "_cpu_int8", None)
    with pytest.raises(ValueError, match="not built"):
        DynamicInt8Linear(qweight, scales, kernel="glmkit")
    assert cpu_int8.default_kernel() == "fbgemm"


@pytest.mark.skipif("glmkit" not in HERE, reason="glmkit's kernel not built")
def test_the_instruction_set_named_must_run_here(monkeypatch):
    qweight, scales = int8_weight(8, 32)
    assert DynamicInt8Linear(qweight, scales, kernel="glmkit").isa == ISAS[-1]  # the widest
    with pytest.raises(ValueError, match="isa='sse'"):
        DynamicInt8Linear(qweight, scales, kernel="glmkit", isa="sse")
    monkeypatch.setenv("GLMKIT_INT8_ISA", "neon")
    with pytest.raises(ValueError, match="GLMKIT_INT8_ISA='neon': this CPU runs glmkit's kernel on avx2"):
        DynamicInt8Linear(qweight, scales, kernel="glmkit")
    monkeypatch.setenv("GLMKIT_INT8_ISA", "avx2")
    assert DynamicInt8Linear(qweight, scales, kernel="glmkit").isa == "avx2"
    with pytest.raises(ValueError, match="this CPU does not run it"):  # the extension checks too
        cpu_int8._cpu_int8.linear(0, False, 1, 32, 0, 64, 8, 0, 0, 0, 0, False, 1, False, 7)


@pytest.mark.skipif("glmkit" not in HERE, reason="glmkit's kernel not built")
def test_using_kernel_chooses_for_the_block_and_restores(monkeypatch):
    qweight, scales = int8_weight(8, 32)
    monkeypatch.setenv("GLMKIT_INT8_ISA", ISAS[-1])
    monkeypatch.delenv("GLMKIT_INT8_KERNEL", raising=False)
    with cpu_int8.using_kernel("glmkit", "avx2"):
        assert DynamicInt8Linear(qweight, scales).isa == "avx2"
    assert DynamicInt8Linear(qweight, scales).isa == ISAS[-1]  # the value set before, back
    assert "GLMKIT_INT8_KERNEL" not in os.environ
    if "fbgemm" in HERE:
        with cpu_int8.using_kernel("fbgemm"):
            assert DynamicInt8Linear(qweight, scales).kernel == "fbgemm"
