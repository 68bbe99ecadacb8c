"""Asymmetric int4 (per-group offsets) and act-order in QuantLinear, and AutoAWQ / AutoGPTQ 4-bit checkpoints.

The checkpoints are packed here from the formats' documentation, independently of models/awq_gptq.py, and each
comes with the float checkpoint it stands for (its dequantized weights): the converted layers must dequantize to
exactly those weights, and the quantized model must decode like the float one.
"""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from checkpoint_fixtures import llama_config, make_hf_dir, random_llama_state
from glmkit import LLM, SamplingParams
from glmkit.errors import InvalidParameterError, ModelLoadError
from glmkit.models.layers import AttentionBatch, SeqSlice
from glmkit.models.loader import load_state_dict, read_config
from glmkit.models.quant import QuantLinear, dequantize, pack_int4, plan_for


PROMPT = [5, 17, 33, 64, 101, 7, 250, 3, 90, 44, 12]


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


@torch.inference_mode()
def prompt_logits(llm: LLM, ids=None) -> torch.Tensor:
    """fp32 logits at every position of `ids` (default PROMPT), from one causal pass."""
    ids = PROMPT if ids is None else ids
    c, n, device = llm.model_config, len(ids), llm.device
    caches = [(torch.zeros(n, c.num_kv_heads, c.head_dim, dtype=llm.dtype, device=device),
               torch.zeros(n, c.num_kv_heads, c.head_dim, dtype=llm.dtype, device=device))
              for _ in range(c.num_layers)]
    positions = torch.arange(n, device=device)
    hidden = llm.model(torch.tensor(ids, device=device), positions,
                       AttentionBatch(positions, [SeqSlice(0, n, None)]), caches)
    return llm.model.compute_logits(hidden).float().cpu()


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


# -- the packer: AWQ "gemm" and GPTQ tensors from q, zeros and scales, written from the formats' documentation --

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ gemm: nibble i of each int32 holds column AWQ_PACK_ORDER[i]


def int32_words(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 -> [...] int32 with value i in bits 4i..4i+3 (two's complement past bit 31)."""
    words = sum(nibbles[..., i].long() << (4 * i) for i in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_columns(u: torch.Tensor, order=range(8)) -> torch.Tensor:
    """[rows, cols] 0..15 -> int32 [rows, cols/8], 8 consecutive columns per word, column order[i] in nibble i."""
    rows, cols = u.shape
    blocks = u.view(rows, cols // 8, 8)
    return int32_words(blocks[..., list(order)])


def pack_rows(u: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 0..15 -> int32 [rows/8, cols], row 8r + i in nibble i of word row r (GPTQ's qweight)."""
    rows, cols = u.shape
    return int32_words(u.view(rows // 8, 8, cols).transpose(1, 2))


@dataclass
class Quantized:
    """One linear as a 4-bit checkpoint holds it: u [in, out], zeros and scales [groups, out], g_idx [in]."""
    u: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor  # fp16
    g_idx: torch.Tensor

    def weight(self) -> torch.Tensor:
        """The float [out, in] weight it stands for: (u - z) * s, exact in fp32."""
        z, s = self.zeros[self.g_idx].float(), self.scales[self.g_idx].float()
        return ((self.u.float() - z) * s).t().contiguous()


def quantize_layer(w: torch.Tensor, group: int, sym=False, zero_min=0, order=None) -> Quantized:
    """Min-max asymmetric (or symmetric) 4-bit quantization of w [out, in]; `order`: the columns are grouped in
    this order (GPTQ's desc_act: by decreasing activation size, the same for linears that share an input)."""
    out_features, in_features = w.shape
    group = group if group > 0 else in_features
    groups = in_features // group
    order = torch.arange(in_features) if order is None else order
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group).to(torch.int32)
    wg = w.t()  # [in, out]
    lo = torch.stack([wg[g_idx == g].amin(0) for g in range(groups)])  # [groups, out]
    hi = torch.stack([wg[g_idx == g].amax(0) for g in range(groups)])
    if sym:
        scales = (torch.maximum(hi.abs(), lo.abs()) / 7).half()
        zeros = torch.full_like(scales, 8, dtype=torch.int32)
    else:
        scales = ((hi - lo) / 15).half()
        zeros = torch.round(-lo / scales.float()).clamp(zero_min, 15).to(torch.int32)
    u = torch.round(wg / scales[g_idx].float() + zeros[g_idx]).clamp(0, 15).to(torch.int32)
    return Quantized(u, zeros, scales, g_idx.to(torch.int32))


def awq_tensors(prefix: str, layer: Quantized) -> dict:
    return {prefix + "qweight": pack_columns(layer.u, AWQ_PACK_ORDER),
            prefix + "qzeros": pack_columns(layer.zeros, AWQ_PACK_ORDER), prefix + "scales": layer.scales}


def gptq_tensors(prefix: str, layer: Quantized, v2: bool) -> dict:
    stored_zeros = layer.zeros if v2 else layer.zeros - 1  # v1 keeps z - 1
    return {prefix + "qweight": pack_rows(layer.u), prefix + "qzeros": pack_columns(stored_zeros & 0xF),
            prefix + "scales": layer.scales, prefix + "g_idx": layer.g_idx}


LINEARS = {  # checkpoint linear: its input (linears of one input share act-order's column order)
    "self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "attn_out", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "mlp_mid"}


def quantized_checkpoint(out, tokenizer_dir, method: str, group: int = 32, sym=False, v2=False, act_order=False,
                         seed=0, model_type="qwen2", extra_config=None, scale=0.15, head=False):
    """(quantized model dir, float model dir with its dequantized weights, {checkpoint linear name: float weight})
    for a tiny random model (hidden 128, FFN 256: room for groups of 32 to 128 and one group per row)."""
    config = llama_config(512, model_type) | {"hidden_size": 128, "intermediate_size": 256}
    state = random_llama_state(config, seed=seed, scale=scale)
    gen = torch.Generator().manual_seed(seed + 1)
    packed, floats = {}, dict(state)
    weights = {}
    for i in range(config["num_hidden_layers"]):
        orders = {}  # one column order per input: q/k/v share theirs, gate/up theirs
        for linear in LINEARS:
            name = f"model.layers.{i}.{linear}"
            w = state.pop(name + ".weight")
            if act_order and LINEARS[linear] not in orders:
                orders[LINEARS[linear]] = torch.randperm(w.shape[1], generator=gen)
            layer = quantize_layer(w, group, sym=sym, zero_min=0 if v2 or method == "awq" else 1,
                                   order=orders.get(LINEARS[linear]))
            weights[name] = floats[name + ".weight"] = layer.weight()
            packed |= awq_tensors(name + ".", layer) if method == "awq" else gptq_tensors(name + ".", layer, v2)
    if head:  # GPTQModel's lm_head=True: the output layer quantized too
        layer = quantize_layer(state.pop("lm_head.weight"), group, sym=sym, zero_min=0 if v2 else 1)
        weights["lm_head"] = floats["lm_head.weight"] = layer.weight()
        packed |= gptq_tensors("lm_head.", layer, v2)
    qc = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
           "modules_to_not_convert": None} if method == "awq" else
          {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": sym,
           "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
           "checkpoint_format": "gptq_v2" if v2 else "gptq"})
    qc |= (extra_config or {}) | ({"lm_head": True} if head else {})
    qdir = make_hf_dir(out / method, state | packed, config | {"quantization_config": qc}, tokenizer_dir)
    fdir = make_hf_dir(out / "float", floats, config, tokenizer_dir)
    return qdir, fdir, weights


FUSED = {"q_proj": ("attn.qkv", 0), "k_proj": ("attn.qkv", 1), "v_proj": ("attn.qkv", 2),
         "o_proj": ("attn.o", 0), "gate_proj": ("mlp.gate_up", 0), "up_proj": ("mlp.gate_up", 1),
         "down_proj": ("mlp.down", 0)}


def converted_weights(qdir, weights) -> dict:
    """{internal linear name: (dequantized weight in x's column order, the float weights it fuses, in order)}."""
    raw, _ = read_config(qdir)
    state = load_state_dict(qdir, "qwen2", torch.bfloat16, plan_for(raw, None))
    out = {}
    for name in sorted(weights):
        layer = name.split(".")[2]
        internal, position = FUSED[name.rpartition(".")[2]]
        key = f"layers.{layer}.{internal}"
        if key not in out:
            w = dequantize(4, state[key + ".qweight"], state[key + ".scales"], torch.float32,
                           state.get(key + ".offsets"))
            if key + ".perm" in state:
                w = torch.empty_like(w).index_copy_(1, state[key + ".perm"], w)
            out[key] = (w, {})
        out[key][1][position] = weights[name]
    return {key: (w, torch.cat([parts[i] for i in sorted(parts)])) for key, (w, parts) in out.items()}


CASES = {  # name: quantized_checkpoint arguments
    "awq": dict(method="awq"),
    "awq-g128": dict(method="awq", group=128),
    "gptq-v1": dict(method="gptq"),
    "gptq-v2": dict(method="gptq", v2=True),
    "gptq-sym": dict(method="gptq", sym=True),
    "gptq-per-row": dict(method="gptq", group=-1),
    "gptq-act-order": dict(method="gptq", act_order=True, group=64),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory, hf_tokenizer_dir):
    out = tmp_path_factory.mktemp(request.param)
    return (request.param, *quantized_checkpoint(out, hf_tokenizer_dir, **CASES[request.param]))


def test_converted_layers_dequantize_to_the_packed_float_weights(checkpoint):
    case, qdir, _, weights = checkpoint
    converted = converted_weights(qdir, weights)
    assert len(converted) == 2 * 4
    for key, (got, expected) in converted.items():
        assert torch.equal(got, expected), (case, key, float((got - expected).abs().max()))


def assert_decodes_like_float(quantized: LLM, fdir, device: str = "cpu") -> None:
    """Greedy decoding (bf16 activations, glmkit's int4 kernels) against the dequantized float checkpoint in bf16:
    the same 16 tokens. Should bf16 rounding (of either run) flip a near-tie, each token must still be the float
    model's greedy choice up to that rounding (checked in fp32, teacher-forced)."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    exact = LLM(str(fdir), device=device, dtype="float32")
    # bf16 activations alone put the logits ~2% (of the largest) off fp32 on these random models; a wrong
    # nibble order, zero point or group would put them ~100% off.
    assert rel_err(prompt_logits(quantized), prompt_logits(exact)) < 0.04
    got = quantized.generate([PROMPT], params)[0].outputs[0].token_ids
    expected = LLM(str(fdir), device=device, dtype="bfloat16").generate([PROMPT], params)[0].outputs[0].token_ids
    if got != expected:
        logits = prompt_logits(exact, PROMPT + got[:-1])[len(PROMPT) - 1:]  # [16, vocab]: what predicts each token
        chosen = logits.gather(1, torch.tensor(got)[:, None]).squeeze(1)
        assert bool((logits.amax(1) - chosen <= 0.03 * logits.abs().amax(1)).all()), (got, expected)


def test_quantized_checkpoint_decodes_as_its_float_weights(checkpoint):
    case, qdir, fdir, _ = checkpoint
    quantized = LLM(str(qdir), device="cpu")
    assert quantized.dtype == torch.bfloat16 and quantized.quantization.source == case.split("-")[0]
    layer = quantized.model.layers[0]
    assert isinstance(layer.mlp.down, QuantLinear) and not isinstance(quantized.model.lm_head, QuantLinear)
    assert layer.attn.qkv.asymmetric == (case != "gptq-sym")
    assert (layer.attn.qkv.perm is not None) == (case == "gptq-act-order")
    assert_decodes_like_float(quantized, fdir)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["awq", "gptq-act-order", "gptq-sym", "gptq-per-row", "awq-g16"])
def test_cuda_decoding_matches_the_float_weights(tmp_path, hf_tokenizer_dir, case):
    """On a GPU: the Triton kernel plus the offsets in torch, decode steps replayed from CUDA graphs (group 16 too,
    which the CPU kernel cannot take)."""
    kwargs = CASES.get(case) or dict(method="awq", group=16)
    qdir, fdir, _ = quantized_checkpoint(tmp_path, hf_tokenizer_dir, **kwargs)
    quantized = LLM(str(qdir), device="cuda")
    assert quantized.model.layers[0].mlp.gate_up.qweight.is_cuda
    assert_decodes_like_float(quantized, fdir, "cuda")


def test_gptq_v1_and_v2_zero_conventions_differ_by_one(tmp_path, hf_tokenizer_dir):
    """The same tensors read as v1 (qzeros hold z - 1) and as v2 (qzeros hold z): the offsets differ by one scale."""
    qdir, _, weights = quantized_checkpoint(tmp_path, hf_tokenizer_dir, "gptq", v2=True)
    raw = json.loads((qdir / "config.json").read_text())
    as_v2 = load_state_dict(qdir, "qwen2", torch.bfloat16, plan_for(raw, None))
    raw["quantization_config"]["checkpoint_format"] = "gptq"
    as_v1 = load_state_dict(qdir, "qwen2", torch.bfloat16, plan_for(raw, None))
    key = "layers.1.mlp.down"
    assert torch.equal(as_v2[key + ".qweight"], as_v1[key + ".qweight"])
    assert torch.allclose(as_v2[key + ".offsets"] - as_v1[key + ".offsets"], as_v2[key + ".scales"])
    assert torch.equal(converted_weights(qdir, weights)[key][0], weights["model.layers.1.mlp.down_proj"])


@pytest.mark.parametrize("method,side", [("gptq", "quantize_config.json"), ("awq", "quant_config.json")])
def test_settings_beside_config_json_are_read(tmp_path, hf_tokenizer_dir, method, side):
    """Older AutoGPTQ / AutoAWQ releases: the settings in quantize_config.json / quant_config.json (AutoAWQ's own
    key names), none in config.json."""
    qdir, _, weights = quantized_checkpoint(tmp_path, hf_tokenizer_dir, method)
    raw = json.loads((qdir / "config.json").read_text())
    qc = raw.pop("quantization_config")
    if method == "awq":
        qc = {"zero_point": True, "q_group_size": qc["group_size"], "w_bit": 4, "version": "GEMM"}
    else:
        del qc["quant_method"], qc["checkpoint_format"]
    (qdir / "config.json").write_text(json.dumps(raw))
    (qdir / side).write_text(json.dumps(qc))
    llm = LLM(str(qdir), device="cpu")
    assert llm.quantization.source == method and llm.quantization.group_size == 32
    for key, (got, expected) in converted_weights(qdir, weights).items():
        assert torch.equal(got, expected), key


def test_a_quantized_output_layer_runs_quantized(tmp_path, hf_tokenizer_dir):
    qdir, fdir, weights = quantized_checkpoint(tmp_path, hf_tokenizer_dir, "gptq", head=True)
    llm = LLM(str(qdir), device="cpu")
    assert isinstance(llm.model.lm_head, QuantLinear) and not llm.model_config.tie_word_embeddings
    raw, _ = read_config(qdir)
    state = load_state_dict(qdir, "qwen2", torch.bfloat16, plan_for(raw, None))
    head = dequantize(4, state["lm_head.qweight"], state["lm_head.scales"], torch.float32, state["lm_head.offsets"])
    assert torch.equal(head, weights["lm_head"])
    assert_decodes_like_float(llm, fdir)


def test_fused_linears_with_different_act_orders_are_refused(tmp_path, hf_tokenizer_dir):
    from safetensors.torch import load_file, save_file

    qdir, _, _ = quantized_checkpoint(tmp_path, hf_tokenizer_dir, "gptq", act_order=True, group=64)
    tensors = load_file(qdir / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0)  # still 64 columns per group, in another order than q_proj's
    save_file(tensors, qdir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="layers.0.attn.qkv have different act-order column orders"):
        LLM(str(qdir), device="cpu")


def test_layers_left_in_float_load_as_float(tmp_path, hf_tokenizer_dir):
    """modules_to_not_convert: a linear a checkpoint keeps in float stays an nn.Linear."""
    from safetensors.torch import load_file, save_file

    qdir, fdir, _ = quantized_checkpoint(tmp_path, hf_tokenizer_dir, "awq",
                                         extra_config={"modules_to_not_convert": ["mlp.down_proj"]})
    tensors = load_file(qdir / "model.safetensors")
    floats = load_file(fdir / "model.safetensors")
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj."
        for piece in ("qweight", "qzeros", "scales"):
            del tensors[name + piece]
        tensors[name + "weight"] = floats[name + "weight"]
    save_file(tensors, qdir / "model.safetensors")
    llm = LLM(str(qdir), device="cpu")
    assert not isinstance(llm.model.layers[1].mlp.down, QuantLinear)
    assert isinstance(llm.model.layers[1].mlp.gate_up, QuantLinear)
    assert rel_err(prompt_logits(llm), prompt_logits(LLM(str(fdir), device="cpu", dtype="float32"))) < 0.04


@pytest.mark.parametrize("method,change,message", [
    ("gptq", {"bits": 8}, r"quantization_config.bits=8 \(quant_method 'gptq'\): glmkit runs 4-bit GPTQ"),
    ("gptq", {"bits": 3}, r"quantization_config.bits=3 .*4-bit"),
    ("awq", {"bits": 8}, r"quantization_config.bits=8 \(quant_method 'awq'\)"),
    ("awq", {"version": "gemv"}, r"quantization_config.version='gemv' .*\"gemm\" layout only"),
    ("gptq", {"checkpoint_format": "marlin"}, r"quantization_config.checkpoint_format='marlin' .*gptq_v2"),
    ("gptq", {"group_size": 0}, r"quantization_config.group_size=0"),
])
def test_unsupported_configs_are_refused_with_the_field(tmp_path, hf_tokenizer_dir, method, change, message):
    qdir, _, _ = quantized_checkpoint(tmp_path, hf_tokenizer_dir, method, extra_config=change)
    with pytest.raises(ModelLoadError, match=message):
        LLM(str(qdir), device="cpu")


def test_groups_the_cpu_kernel_cannot_take_are_refused_there(tmp_path, hf_tokenizer_dir):
    qdir, _, weights = quantized_checkpoint(tmp_path, hf_tokenizer_dir, "awq", group=16)
    assert all(torch.equal(got, expected) for got, expected in converted_weights(qdir, weights).values())
    with pytest.raises(InvalidParameterError, match="group_size=16: must be a multiple of 32 for the CPU"):
        LLM(str(qdir), device="cpu")


def test_quantizing_again_is_refused(tmp_path, hf_tokenizer_dir):
    qdir, _, _ = quantized_checkpoint(tmp_path, hf_tokenizer_dir, "awq")
    for mode in ("int8", "int4"):
        with pytest.raises(InvalidParameterError, match="already quantized .*omit --quantization"):
            LLM(str(qdir), device="cpu", quantization=mode)
    from glmkit.models.export import save_quantized
    from glmkit.models.quant import QuantPlan

    with pytest.raises(ModelLoadError, match="already quantized"):  # glmkit quantize
        save_quantized(qdir, QuantPlan.fresh(4), tmp_path / "again")
    raw = json.loads((qdir / "config.json").read_text())
    del raw["quantization_config"]  # tensors of a 4-bit layer, but a config that does not say so
    (qdir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="qweight.* is part of an AWQ/GPTQ 4-bit layer"):
        LLM(str(qdir), device="cpu")
