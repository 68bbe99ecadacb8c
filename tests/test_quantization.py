"""Weight-only int8/int4: the layouts, the CPU kernels, fresh quantization at load time, ChatGLM's own
-int4/-int8 checkpoints, and saved quantized copies."""

import json
import shutil

import pytest
import torch

from checkpoint_fixtures import (chatglm_config, chatglm_official_dequantized, chatglm_official_quantized,
                                 llama_config, make_hf_dir, random_chatglm_state, random_llama_state,
                                 write_weights)
from glmkit import LLM, SamplingParams
from glmkit.cli import main as cli_main
from glmkit.errors import InvalidParameterError, ModelLoadError
from glmkit.models.layers import AttentionBatch, SeqSlice
from glmkit.models.quant import (QuantLinear, dequantize, pack_int4, quantize_int4, quantize_int8,
                                 unpack_int4)
from glmkit.tokenizers.chatglm_sp import ChatGLMSPTokenizer

PROMPT = [5, 17, 33, 64, 101, 7, 250, 3, 90, 44, 12]


@torch.inference_mode()
def prompt_logits(llm: LLM, ids=PROMPT) -> torch.Tensor:
    """fp32 logits at every prompt position, from one causal pass."""
    c, n = llm.model_config, len(ids)
    caches = [(torch.zeros(n, c.num_kv_heads, c.head_dim, dtype=llm.dtype),) * 2 for _ in range(c.num_layers)]
    caches = [(k, k.clone()) for k, _ in caches]
    batch = AttentionBatch(torch.arange(n), [SeqSlice(0, n, None)])
    hidden = llm.model(torch.tensor(ids), torch.arange(n), batch, caches)
    return llm.model.compute_logits(hidden)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def sp_vocab(sp_model_path):
    return ChatGLMSPTokenizer(sp_model_path).vocab_size


def chatglm_dir(path, sp_model_path, state, config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    write_weights(path, state, "safetensors")
    shutil.copy(sp_model_path, path / "tokenizer.model")
    return path


# -- layouts and kernels ---------------------------------------------------------------------------------

def test_int4_packing_is_high_nibble_first_and_signed():
    q = torch.tensor([[-8, 7, 3, -1, 0, -5]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.tolist() == [[-128 | 7, 0x3F, 0x0B]]  # 0x87, 0x3F, 0x0B as signed bytes
    assert torch.equal(unpack_int4(packed), q)


def test_int8_error_is_within_half_a_step():
    w = torch.randn(48, 128)
    q, s = quantize_int8(w)
    assert bool(((dequantize(8, q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("group", [32, 64])
def test_int4_scale_search_beats_max_abs_in_every_group(group):
    w = torch.randn(48, 128) * torch.rand(48, 1)
    q, s = quantize_int4(w, group)
    err = (dequantize(4, q, s) - w).pow(2).view(48, -1, group).sum(-1)
    plain = w.abs().view(48, -1, group).amax(-1) / 7  # the max-abs scale: never clips
    plain_q = torch.round(w.view(48, -1, group) / plain[..., None]).clamp(-8, 7)
    plain_err = (plain_q * plain[..., None] - w.view(48, -1, group)).pow(2).sum(-1)
    assert bool((err <= plain_err + 1e-6).all()) and float(err.sum()) < 0.9 * float(plain_err.sum())


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 32), (4, 128), (4, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_kernels_match_the_dequantized_weight(bits, group, dtype):
    torch.manual_seed(0)
    w, x, bias = torch.randn(40, 384), torch.randn(5, 384), torch.randn(40)  # 40 rows: not a tile multiple
    q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, group)
    layer = QuantLinear(384, 40, True, bits, group)
    layer.qweight, layer.scales, layer.bias.data = q, s, bias.clone()
    expected = x @ dequantize(bits, q, s).T + bias
    layer.bias.requires_grad_(False)
    layer.prepare(dtype)  # group 384 (one per row, as ChatGLM's checkpoints) is repeated per 128 for the kernel
    got = layer(x.to(dtype).view(1, 5, 384)).view(5, 40).float()
    assert rel_err(got, expected) < 0.02


def test_float32_activations_are_refused_with_the_fix():
    layer = QuantLinear(64, 8, False, 8, 64)
    with pytest.raises(InvalidParameterError, match="--dtype bfloat16"):
        layer.prepare(torch.float32)


# -- models ---------------------------------------------------------------------------------------------

def dequantized_copy(state: dict, config: dict, bits: int) -> tuple[dict, dict]:
    """The float checkpoint that a fresh int8/int4 quantization of `state` stands for (head always int8; int4
    keeps the q/k/v projections in int8, which per output row is the same as quantizing the fused qkv)."""
    state = dict(state)
    if config.get("tie_word_embeddings"):
        state["lm_head.weight"], config = state["model.embed_tokens.weight"], config | {"tie_word_embeddings": False}
    for name, w in state.items():
        if name.endswith("proj.weight") or name == "lm_head.weight":
            qkv = name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))
            b = 8 if name == "lm_head.weight" or qkv else bits
            state[name] = dequantize(b, *(quantize_int8(w) if b == 8 else quantize_int4(w, 32)))
    return state, config


@pytest.mark.parametrize("tie", [False, True])
def test_fresh_quantization_computes_the_dequantized_model(tmp_path, hf_tokenizer_dir, tie):
    config = llama_config(512, "qwen2", tie=tie)
    state = random_llama_state(config, seed=4)
    d = make_hf_dir(tmp_path / "qwen", state, config, hf_tokenizer_dir)
    float_logits = prompt_logits(LLM(str(d), dtype="float32", device="cpu"))
    errors = {}
    for mode, bits in (("int8", 8), ("int4", 4)):
        llm = LLM(str(d), device="cpu", quantization=mode)
        assert llm.dtype == torch.bfloat16 and llm.quantization.mode == mode
        assert not llm.model_config.tie_word_embeddings  # the head is a quantized copy of its own
        got = prompt_logits(llm)
        ref_dir = make_hf_dir(tmp_path / f"deq{bits}", *dequantized_copy(state, config, bits), hf_tokenizer_dir)
        # bf16 activations alone account for ~3% of the largest logit on these random models
        assert rel_err(got, prompt_logits(LLM(str(ref_dir), dtype="float32", device="cpu"))) < 0.06
        errors[mode] = rel_err(got, float_logits)
        layer = llm.model.layers[0]
        assert (layer.attn.qkv.bits, layer.mlp.gate_up.bits, llm.model.lm_head.bits) == (8, bits, 8)
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
        assert len(out.outputs[0].token_ids) == 6
    assert errors["int8"] < errors["int4"], errors


@pytest.mark.parametrize("bits", [4, 8])
def test_official_chatglm_quantized_checkpoint_loads_directly(tmp_path, sp_model_path, sp_vocab, bits):
    config = chatglm_config(sp_vocab)
    quantized = chatglm_official_quantized(random_chatglm_state(config, seed=5), bits)
    qdir = chatglm_dir(tmp_path / f"int{bits}", sp_model_path, quantized, config | {"quantization_bit": bits,
                                                                                     "torch_dtype": "float16"})
    fdir = chatglm_dir(tmp_path / "float", sp_model_path, chatglm_official_dequantized(quantized, bits), config)
    llm = LLM(str(qdir), device="cpu")
    assert llm.quantization.source == "chatglm" and llm.quantization.mode == f"int{bits}"
    assert llm.dtype == torch.bfloat16
    assert type(llm.model.lm_head).__name__ == "Linear"  # the official output layer stays in float
    ref = prompt_logits(LLM(str(fdir), device="cpu", dtype="float32"))
    # bf16 activations alone differ by ~3% of the largest logit on this random model; a wrong nibble order or
    # scale would differ by ~100%.
    assert rel_err(prompt_logits(llm), ref) < 0.08
    with pytest.raises(InvalidParameterError, match="already quantized"):
        LLM(str(qdir), device="cpu", quantization="int8" if bits == 4 else "int4")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_quantized_copy_loads_without_quantizing_again(tmp_path, hf_tokenizer_dir, capsys, mode):
    config = llama_config(512, "qwen2", tie=True)
    d = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=6), config, hf_tokenizer_dir)
    out = tmp_path / f"qwen-{mode}"
    assert cli_main(["quantize", "--model", str(d), "--quantization", mode, "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"] == {"quant_method": "glmkit", "bits": int(mode[3]), "group_size": 32,
                                            "head_bits": 8, "int8_layers": ["attn.qkv"] if mode == "int4" else []}
    assert (out / "tokenizer.json").is_file()
    fresh, reloaded = LLM(str(d), device="cpu", quantization=mode), LLM(str(out), device="cpu")
    assert reloaded.quantization.source == "glmkit"
    assert torch.equal(prompt_logits(fresh), prompt_logits(reloaded))
    assert cli_main(["quantize", "--model", str(d), "--quantization", "int8", "--output", str(out)]) == 2


def test_copy_saved_before_int8_layers_loads_all_int4(tmp_path, hf_tokenizer_dir):
    """Copies written before int4 kept qkv in int8 have no `int8_layers`: every linear but the head is int4."""
    from glmkit.models.export import save_quantized
    from glmkit.models.quant import QuantPlan

    config = llama_config(512, "qwen2")
    d = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=9), config, hf_tokenizer_dir)
    out = save_quantized(d, QuantPlan(4), tmp_path / "old-int4")
    raw = json.loads((out / "config.json").read_text())
    del raw["quantization_config"]["int8_layers"]
    (out / "config.json").write_text(json.dumps(raw))
    llm = LLM(str(out), device="cpu")
    assert llm.model.layers[0].attn.qkv.bits == 4 and llm.quantization.int8_layers == ()
    assert len(llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids) >= 1


def test_bad_quantization_settings_are_clear(tmp_path, hf_tokenizer_dir):
    config = llama_config(512, "qwen2")
    d = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=7), config, hf_tokenizer_dir)
    with pytest.raises(InvalidParameterError, match="quantization"):
        LLM(str(d), device="cpu", quantization="int3")
    with pytest.raises(InvalidParameterError, match="bfloat16"):
        LLM(str(d), device="cpu", quantization="int8", dtype="float32")
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(raw | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ModelLoadError, match="gptq"):
        LLM(str(d), device="cpu")


def test_cached_quantized_copy_is_made_once(tmp_path, hf_tokenizer_dir, monkeypatch):
    """The embedded model's int8 copy is written beside its conversion once and reused by later starts."""
    from glmkit.models import export
    from glmkit.models.quant import QuantPlan

    config = llama_config(512, "qwen2")
    d = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=8), config, hf_tokenizer_dir)
    first = export.cached_quantized_copy(d, QuantPlan(8))
    assert first.name == "qwen-int8-g32" and (first / "model.safetensors").is_file()
    monkeypatch.setattr(export, "save_quantized", lambda *a: pytest.fail("quantized twice"))
    assert export.cached_quantized_copy(d, QuantPlan(8)) == first
    assert LLM(str(first), device="cpu").quantization.source == "glmkit"


def int8a8_runs_here() -> bool:
    from glmkit.models import cpu_int8

    return cpu_int8.runs_here()


@pytest.mark.skipif(not int8a8_runs_here(), reason="int8 activations need fbgemm and an x86 CPU with AVX2")
def test_int8a8_runs_the_int8_weights_with_int8_activations(tmp_path, hf_tokenizer_dir):
    from glmkit.models.cpu_int8 import DynamicInt8Linear

    config = llama_config(512, "qwen2")
    d = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=9), config, hf_tokenizer_dir)
    w8a16 = LLM(str(d), device="cpu", quantization="int8", enable_prefix_caching=False)
    w8a8 = LLM(str(d), device="cpu", quantization="int8a8", enable_prefix_caching=False)
    assert w8a8.resolved_config.quantization == "int8a8" and w8a16.resolved_config.quantization == "int8"
    switched = {name.rpartition(".")[2] for name, m in w8a8.model.named_modules()
                if isinstance(m, QuantLinear) and isinstance(m._forward, DynamicInt8Linear)}
    from glmkit.models.cpu_int8 import default_kernel

    # glmkit's kernel runs qkv too (two 8-bit halves per row); on fbgemm qkv keeps bf16 activations
    assert switched == {"o", "gate_up", "down", "lm_head"} | ({"qkv"} if default_kernel() == "glmkit" else set())
    assert not any(isinstance(m._forward, DynamicInt8Linear) for m in w8a16.model.modules()
                   if isinstance(m, QuantLinear))
    assert rel_err(prompt_logits(w8a8), prompt_logits(w8a16)) < 0.05
    out = w8a8.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_int8a8_is_refused_where_it_cannot_run(tmp_path, hf_tokenizer_dir, monkeypatch):
    from glmkit.models import cpu_int8

    config = llama_config(512, "qwen2")
    d = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=9), config, hf_tokenizer_dir)
    monkeypatch.setattr(cpu_int8, "runs_here", lambda: False)
    with pytest.raises(InvalidParameterError, match="int8a8.*AVX2.*use int8"):
        LLM(str(d), device="cpu", quantization="int8a8")
