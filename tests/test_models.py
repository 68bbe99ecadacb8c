"""Every checkpoint layout loads, and the engine's incremental paged path matches a naive full recompute."""

import json
import shutil

import pytest

from checkpoint_fixtures import (chatglm_config, chatglm_to_glm_hf, llama_config, make_chatglm_dir, make_hf_dir,
                                 random_chatglm_state, random_llama_state, write_gguf)
from glmkit import LLM, SamplingParams
from glmkit.errors import ModelLoadError
from glmkit.tokenizers.chatglm_sp import ChatGLMSPTokenizer
from reference import chatglm_reference, llama_reference

PROMPT = [5, 17, 33, 64, 101, 7, 250, 3, 90]


def greedy(llm, prompt=PROMPT, n=12):
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0].token_ids


def reference_greedy(ref, n=12, prompt=PROMPT):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(ref(ids)[-1].argmax()))
    return ids[len(prompt):]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Converted tiny GGUFs go to the test's own directory, not the user's ~/.cache/glmkit."""
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sp_vocab(sp_model_path):
    return ChatGLMSPTokenizer(sp_model_path).vocab_size


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_chatglm_layouts_match_reference(tmp_path, sp_model_path, sp_vocab, layout):
    d = make_chatglm_dir(tmp_path / layout, sp_model_path, sp_vocab, layout=layout, seed=1)
    llm = LLM(str(d), dtype="float32", device="cpu")
    state = random_chatglm_state(chatglm_config(sp_vocab), seed=1)
    config = json.loads((d / "config.json").read_text())
    expected = reference_greedy(lambda ids: chatglm_reference(state, config, ids))
    assert greedy(llm) == expected


def test_chatglm_rope_ratio_and_glm4_shape(tmp_path, glm4_ranks_path):
    from glmkit.tokenizers.glm4 import GLM4Tokenizer

    vocab = GLM4Tokenizer(glm4_ranks_path).vocab_size
    d = make_chatglm_dir(tmp_path / "glm4", glm4_ranks_path, vocab, seed=2, rope_ratio=500,
                         eos_token_id=[vocab - 14, vocab - 7, vocab - 5], layernorm_epsilon=1.5625e-07)
    llm = LLM(str(d), dtype="float32", device="cpu")
    assert llm.chat_format.name == "glm4"
    config = json.loads((d / "config.json").read_text())
    state = random_chatglm_state(config, seed=2)
    assert greedy(llm) == reference_greedy(lambda ids: chatglm_reference(state, config, ids))


def test_glm_hf_layout_equals_original(tmp_path, sp_model_path, sp_vocab, hf_tokenizer_dir):
    config = chatglm_config(sp_vocab)
    state = random_chatglm_state(config, seed=3)
    original = make_chatglm_dir(tmp_path / "orig", sp_model_path, sp_vocab, seed=3)
    hf_state, hf_config = chatglm_to_glm_hf(state, config)
    hf = make_hf_dir(tmp_path / "hf", hf_state, hf_config)
    shutil.copy(sp_model_path, hf / "tokenizer.model")
    a = greedy(LLM(str(original), dtype="float32", device="cpu"))
    b = greedy(LLM(str(hf), dtype="float32", device="cpu", chat_format="chatglm3"))
    assert a == b


@pytest.mark.parametrize("model_type,tie", [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_llama_family_matches_reference(tmp_path, hf_tokenizer_dir, model_type, tie):
    from glmkit.tokenizers.hf import HFTokenizer

    vocab = HFTokenizer(hf_tokenizer_dir / "tokenizer.json").vocab_size
    config = llama_config(vocab, model_type, tie)
    state = random_llama_state(config, seed=4)
    d = make_hf_dir(tmp_path / model_type, state, config, hf_tokenizer_dir, layout="safetensors-sharded")
    llm = LLM(str(d), dtype="float32", device="cpu")
    assert greedy(llm) == reference_greedy(lambda ids: llama_reference(state, config, ids))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_gguf_f32_equals_hf_directory(tmp_path, hf_tokenizer_dir, arch, private_cache):
    from glmkit.tokenizers.hf import HFTokenizer

    vocab = HFTokenizer(hf_tokenizer_dir / "tokenizer.json").vocab_size
    config = llama_config(vocab, arch)
    state = random_llama_state(config, seed=5)
    hf = make_hf_dir(tmp_path / "hf", state, config, hf_tokenizer_dir)
    gguf_file = write_gguf(tmp_path / f"tiny-{arch}.gguf", state, config, hf_tokenizer_dir)
    from_gguf = LLM(str(gguf_file), dtype="float32", device="cpu")
    assert greedy(from_gguf) == greedy(LLM(str(hf), dtype="float32", device="cpu"))
    # The GGUF's vocabulary and chat template rebuild the same tokenizer and prompt.
    text = "Hello, how are you? 你好"
    assert from_gguf.tokenizer.encode(text) == HFTokenizer(hf_tokenizer_dir / "tokenizer.json").encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert from_gguf.render_chat(messages) == LLM(str(hf), dtype="float32", device="cpu").render_chat(messages)


@pytest.mark.parametrize("quant,tolerance", [("F16", 0.02), ("Q8_0", 0.05), ("Q5_0", 0.3), ("Q4_0", 0.6)])
def test_gguf_quant_types_dequantize_close(tmp_path, hf_tokenizer_dir, quant, tolerance, private_cache):
    from glmkit.tokenizers.hf import HFTokenizer

    vocab = HFTokenizer(hf_tokenizer_dir / "tokenizer.json").vocab_size
    config = llama_config(vocab, "qwen2")
    state = random_llama_state(config, seed=6)
    gguf_file = write_gguf(tmp_path / f"tiny-{quant}.gguf", state, config, hf_tokenizer_dir, quant=quant)
    llm = LLM(str(gguf_file), dtype="float32", device="cpu")
    loaded = llm.model.layers[0].mlp.down.weight
    original = state["model.layers.0.mlp.down_proj.weight"]
    assert (loaded - original).abs().max() < tolerance * original.abs().max()
    assert len(greedy(llm, n=4)) == 4


def test_gguf_conversion_is_cached(tmp_path, hf_tokenizer_dir, monkeypatch, private_cache):
    from glmkit.models import gguf as gguf_module
    from glmkit.tokenizers.hf import HFTokenizer

    vocab = HFTokenizer(hf_tokenizer_dir / "tokenizer.json").vocab_size
    config = llama_config(vocab, "qwen2")
    gguf_file = write_gguf(tmp_path / "m.gguf", random_llama_state(config), config, hf_tokenizer_dir)
    first = gguf_module.ensure_converted(gguf_file)
    monkeypatch.setattr(gguf_module, "convert", lambda *a: pytest.fail("converted twice"))
    assert gguf_module.ensure_converted(gguf_file) == first


# -- clear errors ----------------------------------------------------------------------------------------

def test_missing_directory():
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM("/nonexistent/chatglm3-6b")


def test_missing_tokenizer(tmp_path, sp_model_path, sp_vocab):
    d = make_chatglm_dir(tmp_path / "m", sp_model_path, sp_vocab)
    (d / "tokenizer.model").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        LLM(str(d), device="cpu")


def test_unsupported_model_type(tmp_path, sp_model_path, sp_vocab):
    d = make_chatglm_dir(tmp_path / "m", sp_model_path, sp_vocab)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model_type='mamba' is not supported; supported model types: chatglm, glm, llama, qwen2"):
        LLM(str(d), device="cpu")


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin-sharded"])
def test_truncated_shard(tmp_path, sp_model_path, sp_vocab, layout):
    d = make_chatglm_dir(tmp_path / "m", sp_model_path, sp_vocab, layout=layout)
    shard = sorted(d.glob("*-00002-of-00002.*"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        LLM(str(d), device="cpu")


def test_missing_shard(tmp_path, sp_model_path, sp_vocab):
    d = make_chatglm_dir(tmp_path / "m", sp_model_path, sp_vocab, layout="safetensors-sharded")
    sorted(d.glob("*-00002-of-00002.*"))[0].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        LLM(str(d), device="cpu")


def test_config_and_weights_disagree(tmp_path, sp_model_path, sp_vocab):
    d = make_chatglm_dir(tmp_path / "m", sp_model_path, sp_vocab)
    config = json.loads((d / "config.json").read_text())
    config["ffn_hidden_size"] = 128
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="shape"):
        LLM(str(d), device="cpu")


def test_prompt_too_long(tmp_path, sp_model_path, sp_vocab):
    from glmkit.errors import ContextLengthError

    d = make_chatglm_dir(tmp_path / "m", sp_model_path, sp_vocab)
    llm = LLM(str(d), device="cpu", max_model_len=32)
    with pytest.raises(ContextLengthError, match="prompt has 40 tokens but the model accepts 32"):
        llm.generate([[5] * 40])
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


@pytest.mark.parametrize("interleaved,rotary_dim", [(True, 16), (False, 32)])
def test_rotary_matches_the_pairwise_form_exactly_and_gathers_once_per_positions(interleaved, rotary_dim):
    """rotate's x * cos + swapped(x) * signed sin rounds as (a cos - b sin, b cos + a sin) does, in bf16 too."""
    import torch

    from glmkit.models.config import ModelConfig
    from glmkit.models.layers import Rotary, rotate

    config = ModelConfig(family="glm", model_type="chatglm", vocab_size=8, hidden_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=2, head_dim=32, intermediate_size=8, rms_norm_eps=1e-5,
                         rope_theta=10000.0, rotary_dim=rotary_dim, rope_interleaved=interleaved, qkv_bias=False,
                         tie_word_embeddings=False, max_position_embeddings=64)
    rotary = Rotary(config, torch.bfloat16, torch.device("cpu"))
    x = torch.randn(5, 2, 32).to(torch.bfloat16)
    positions = torch.tensor([0, 3, 17, 2047, 5000])
    got = rotate(x, *rotary.tables(positions), rotary_dim, interleaved)
    cos, sin = rotary.cos[positions][:, None], rotary.sin[positions][:, None]
    rot = x[..., :rotary_dim]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        expected = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    else:
        a, b = rot.chunk(2, -1)
        expected = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    assert torch.equal(got[..., :rotary_dim], expected) and torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])
    assert rotary.tables(positions)[0] is rotary.tables(positions)[0]  # every layer of a step: gathered once
    other = torch.tensor([1, 1, 1, 1, 1])
    assert torch.equal(rotary.tables(other)[0][:, 0], rotary.cos_full[other])
