"""Serving LoRA adapters beside the base model (LLM API, CPU, fp32): a batch mixing the base and adapters of
different ranks and targets gives every request the tokens it gets alone, and what the adapter's weights folded
into the checkpoint give; adapters never share prefix-cache blocks; an int8 base serves adapters too; served
logits of a Qwen2 LoRA match transformers + peft; adapters load and unload while requests run."""

from __future__ import annotations

import json

import pytest
import torch

from adapter_fixtures import make_adapter, make_prefix, run_together, steady_traffic
from checkpoint_fixtures import llama_config, make_hf_dir, random_llama_state, write_weights
from glmkit import LLM
from glmkit.engine.sampling_params import SamplingParams
from glmkit.errors import InvalidParameterError, ModelLoadError
from glmkit.models import training
from glmkit.models.loader import load_model, read_config
from glmkit.models.lora import merge_into, read_adapter
from glmkit.models.ptuning import read_prefix

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["你好", "晚上睡不着应该怎么办", "hello there", "1 2 3 4"]


@pytest.fixture(scope="module")
def adapters(glm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"qkv4": make_adapter(glm_dir, root / "qkv4", ["query_key_value"], 4, seed=1),
            "all8": make_adapter(glm_dir, root / "all8", ["all-linear"], 8, seed=2),
            "prefix": make_prefix(glm_dir, root / "prefix", 16, False, seed=3)}


@pytest.fixture(scope="module")
def llm(glm_dir, adapters):
    return LLM(str(glm_dir), dtype="float32", device="cpu", adapters={k: str(v) for k, v in adapters.items()})


def tokens(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


def test_a_mixed_batch_gives_each_request_its_tokens_alone(llm):
    names = [None, "qkv4", "all8", "prefix"]
    alone = {(name, p): tokens(llm.generate([p], GREEDY, adapter=name))[0] for name in names for p in PROMPTS}
    assert len({tuple(alone[(n, PROMPTS[1])]) for n in names}) == 4  # each adapter changes the answer
    jobs = [(p, name) for p in PROMPTS for name in names]  # interleaved: base and adapter rows side by side
    assert run_together(llm, jobs, GREEDY) == [alone[(name, p)] for p, name in jobs]


def test_served_adapter_equals_its_weights_folded_in(glm_dir, adapters, llm, tmp_path):
    for name in ("qkv4", "all8"):
        path = adapters[name]
        folded = LLM(str(merge_into(glm_dir, read_adapter(path), tmp_path / name)), dtype="float32", device="cpu")
        assert tokens(folded.generate(PROMPTS, GREEDY)) == tokens(llm.generate(PROMPTS, GREEDY, adapter=name)), name


@pytest.mark.parametrize("projection", [False, True])
def test_served_prefix_equals_the_training_forward(glm_dir, tmp_path, projection):
    """Greedy tokens through the engine (the prefix in pinned KV blocks) equal those of the training path's
    forward with the prefix (checked against ChatGLM's past-key-values attention in test_ptuning.py), run over
    the whole sequence for every new token."""
    prefix_dir = make_prefix(glm_dir, tmp_path / "p", 32, projection, seed=4)
    llm = LLM(str(glm_dir), dtype="float32", device="cpu", adapters={"p": str(prefix_dir)})
    _, config = read_config(glm_dir)
    model = load_model(glm_dir, config, torch.float32, torch.device("cpu"))
    kv = read_prefix(prefix_dir, config).kv
    ids = llm.encode_prompt(PROMPTS[1])
    expected = []
    with torch.no_grad():
        for _ in range(GREEDY.max_tokens):
            seq = ids + expected
            positions, _ = training.positions_and_mask([[len(seq)]], len(seq), "cpu")
            hidden = training.hidden_states(model, torch.tensor([seq]), positions, prefix=kv)
            expected.append(int(model.compute_logits(hidden[0, -1:]).argmax()))
    assert tokens(llm.generate([ids], GREEDY, adapter="p"))[0] == expected
    assert tokens(llm.generate([ids], GREEDY))[0] != expected


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin"])
def test_a_whole_model_saved_with_its_prefix_serves_as_the_prefix(glm_dir, adapters, tmp_path, layout):
    """ChatGLM3's and GLM-4's finetune_demo save P-Tuning v2 as the whole model plus the prefix encoder: served
    as an adapter, only the prefix is taken, and answers as the prefix alone does."""
    from safetensors.torch import load_file

    state = {k: v for f in sorted(glm_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert len(state) > 10  # the base model's own tensors
    state |= torch.load(adapters["prefix"] / "pytorch_model.bin", weights_only=True)
    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "config.json").write_text((adapters["prefix"] / "config.json").read_text())
    write_weights(whole, state, layout)
    llm = LLM(str(glm_dir), dtype="float32", device="cpu", adapters={"alone": str(adapters["prefix"]),
                                                                     "whole": str(whole)})
    assert tokens(llm.generate(PROMPTS, GREEDY, adapter="whole")) == tokens(llm.generate(PROMPTS, GREEDY,
                                                                                          adapter="alone"))


def test_a_prefix_is_pinned_once_and_freed_on_unload(glm_dir, adapters):
    llm = LLM(str(glm_dir), dtype="float32", device="cpu", block_size=8)
    llm.load_adapter("p", adapters["prefix"])
    assert llm.engine.blocks.num_used == 2  # 16 tokens in blocks of 8, however many requests use it
    llm.generate(PROMPTS, GREEDY, adapter="p")
    assert llm.engine.blocks.num_used == 2
    llm.unload_adapter("p")
    assert llm.engine.blocks.num_used == 0
    with pytest.raises(ModelLoadError, match="pre_seq_len=12 is not a multiple.*block size \\(8\\).*no block size"):
        llm.load_adapter("odd", make_prefix(glm_dir, llm.model_dir.parent / "odd-prefix", 12, False, seed=0))


def test_adapters_never_share_prefix_cache_blocks(llm):
    prompt = "同一个很长的提示词，" * 6
    llm.generate([prompt], GREEDY)  # the base fills the cache
    again = llm.generate([prompt], GREEDY)[0]
    adapted = llm.generate([prompt], GREEDY, adapter="all8")[0]
    adapted_again = llm.generate([prompt], GREEDY, adapter="all8")[0]
    assert again.num_cached_tokens > 0
    assert adapted.num_cached_tokens == 0 and adapted_again.num_cached_tokens > 0


def test_an_int8_base_serves_adapters(glm_dir, adapters):
    llm = LLM(str(glm_dir), device="cpu", quantization="int8", adapters={"all8": str(adapters["all8"])})
    alone = [tokens(llm.generate([p], GREEDY, adapter="all8"))[0] for p in PROMPTS]
    base = tokens(llm.generate(PROMPTS, GREEDY))
    assert tokens(llm.generate(PROMPTS, GREEDY, adapter="all8")) == alone != base


def test_unknown_and_mismatched_adapters_are_clear_errors(llm, glm_dir, tmp_path, hf_tokenizer_dir):
    with pytest.raises(InvalidParameterError, match="adapter='nope'.*not loaded.*qkv4, all8, prefix"):
        llm.generate(["hi"], GREEDY, adapter="nope")
    with pytest.raises(InvalidParameterError, match="already loaded"):
        llm.load_adapter("qkv4", tmp_path)
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        llm.load_adapter("empty", tmp_path)
    config = llama_config(96, "qwen2")
    qwen = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=3), config)
    with pytest.raises(ModelLoadError, match="q_proj.*different model"):
        llm.load_adapter("qwen", make_adapter(qwen, tmp_path / "qwen-lora", ["q_proj"], 2, seed=0))
    assert list(llm.adapters) == ["qkv4", "all8", "prefix"]


def test_max_adapters_bounds_what_is_loaded(glm_dir, adapters):
    with pytest.raises(InvalidParameterError, match="max_adapters \\(1\\); raise --max-adapters"):
        LLM(str(glm_dir), dtype="float32", device="cpu", max_adapters=1,
            adapters={"a": str(adapters["qkv4"]), "b": str(adapters["all8"])})
    llm = LLM(str(glm_dir), dtype="float32", device="cpu", max_adapters=1, adapters={"a": str(adapters["qkv4"])})
    with pytest.raises(InvalidParameterError, match="max_adapters=1: adapters are loaded \\(a\\); unload one"):
        llm.load_adapter("b", adapters["all8"])
    llm.unload_adapter("a")
    llm.load_adapter("b", adapters["all8"])
    assert list(llm.adapters) == ["b"]


def test_served_qwen2_lora_logits_match_transformers_peft(tmp_path, hf_tokenizer_dir, hf):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = llama_config(hf.vocab_size, "qwen2")
    qwen = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=8), config, hf_tokenizer_dir)
    adapter = make_adapter(qwen, tmp_path / "lora", ["all-linear"], 4, seed=3)
    llm = LLM(str(qwen), dtype="float32", device="cpu", adapters={"a": str(adapter)})
    ids = [5, 17, 33, 2, 61, 7, 9, 40]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=20)
    _, _, ours = llm.generate([ids], params, adapter="a")[0].outputs[0].logprobs[0]  # (id, logprob, top 20)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(qwen), dtype=torch.float32)
    theirs_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        theirs = torch.log_softmax(theirs_model(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert len(ours) == 20
    for token_id, logprob in ours:
        assert abs(logprob - theirs[token_id].item()) < 1e-3


@pytest.mark.parametrize("projection", [False, True])
def test_served_qwen2_peft_prefix_tuning_matches_transformers_peft(tmp_path, hf_tokenizer_dir, hf, projection):
    """peft's prefix tuning (its own save format) served beside the base: the first token's logprobs and eight
    greedy tokens (decode steps attending to the pinned prefix, rotary positions after it) as transformers + peft
    compute them."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = llama_config(hf.vocab_size, "qwen2")
    qwen = make_hf_dir(tmp_path / "qwen", random_llama_state(config, seed=9), config, hf_tokenizer_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(qwen), dtype=torch.float32)
    torch.manual_seed(4)
    theirs_model = peft.get_peft_model(base, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=16, prefix_projection=projection, encoder_hidden_size=32))
    theirs_model.save_pretrained(str(tmp_path / "prefix"))
    theirs_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(qwen), dtype=torch.float32), str(tmp_path / "prefix"))
    theirs_model.eval()
    llm = LLM(str(qwen), dtype="float32", device="cpu", adapters={"p": str(tmp_path / "prefix")})
    ids = [5, 17, 33, 2, 61, 7, 9, 40]
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=20, ignore_eos=True)
    out = llm.generate([ids], params, adapter="p")[0].outputs[0]
    with torch.no_grad():
        first = torch.log_softmax(theirs_model(torch.tensor([ids])).logits[0, -1].float(), -1)
        greedy = list(ids)
        for _ in range(8):
            greedy.append(int(theirs_model(torch.tensor([greedy])).logits[0, -1].argmax()))
    _, _, ours = out.logprobs[0]
    for token_id, logprob in ours:
        assert abs(logprob - first[token_id].item()) < 1e-3
    assert out.token_ids == greedy[len(ids):]
    runner, launched = llm.engine.runner, []  # decode steps launched ahead (as on a GPU) take the same positions
    launch = runner._launch_ahead
    runner._launch_ahead = lambda *a: launched.append(1) or launch(*a)
    runner.lookahead = True
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)  # logprobs would not run ahead
    assert llm.generate([ids], plain, adapter="p")[0].outputs[0].token_ids == out.token_ids and launched
    runner.lookahead = False
    base_tokens = llm.generate([ids], params)[0].outputs[0].token_ids
    assert base_tokens != out.token_ids  # the prefix changes the answer


def test_peft_prefix_for_other_heads_is_refused(glm_dir, tmp_path):
    """A peft prefix sized for full multi-head keys (what peft makes for ChatGLM, whose config does not name its
    grouped KV heads) does not fit ChatGLM's 2 KV heads: refused at load, naming the shapes."""
    _, config = read_config(glm_dir)
    out = tmp_path / "prefix"
    out.mkdir()
    width = config.num_heads * config.head_dim
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": 16, "num_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "token_dim": width}))
    from safetensors.torch import save_file
    save_file({"prompt_embeddings": torch.zeros(16, config.num_layers * 2 * width)},
              str(out / "adapter_model.safetensors"))
    llm = LLM(str(glm_dir), dtype="float32", device="cpu")
    with pytest.raises(ModelLoadError, match=f"{config.num_heads} key/value heads.*{config.num_kv_heads} heads"):
        llm.load_adapter("p", out)
    assert llm.adapters == {}


def test_load_and_unload_while_requests_stream(glm_dir, adapters):
    llm = LLM(str(glm_dir), dtype="float32", device="cpu", max_num_seqs=8)
    llm.start_engine_thread()
    with steady_traffic(llm, PROMPTS[:2], GREEDY) as errors:
        for cycle in range(100):
            llm.load_adapter("x", adapters["qkv4"])
            llm.generate(["hi"], SamplingParams(temperature=0.0, max_tokens=3), adapter="x")
            llm.unload_adapter("x")
    assert not errors
    assert llm.adapters == {} and not llm.engine.runner.adapters.loaded
    assert all(not w.weights for w in llm.engine.runner.adapters._linears.values())
    assert llm.engine.blocks.num_used == 0
