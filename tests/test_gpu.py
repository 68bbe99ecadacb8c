"""GPU path (marked `gpu`, skipped without CUDA): greedy output on the GPU in fp32 equals the CPU path token for
token on tiny checkpoints, and bf16 stays close (first-step logits within a stated tolerance)."""

import pytest
import torch

from checkpoint_fixtures import llama_config, make_chatglm_dir, make_hf_dir, random_llama_state
from glmkit import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[5, 17, 33, 64, 101], list(range(40, 90)), [300, 301, 7]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# bf16 keeps 8 bits of mantissa: first-step logits of these tiny random models agree within this fraction of
# the largest logit.
BF16_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sp_model_path, sp, hf_tokenizer_dir, hf):
    glm = make_chatglm_dir(tmp_path_factory.mktemp("glm"), sp_model_path, sp.vocab_size, seed=21)
    config = llama_config(hf.vocab_size, "qwen2")
    qwen = make_hf_dir(tmp_path_factory.mktemp("qwen"), random_llama_state(config, seed=22), config, hf_tokenizer_dir)
    return {"chatglm": glm, "qwen2": qwen}


def first_step_logits(llm, prompt):
    from glmkit.models.layers import AttentionBatch, SeqSlice

    device = llm.device
    c = llm.model_config
    n = len(prompt)
    with torch.inference_mode():
        kv = [(torch.zeros(n, c.num_kv_heads, c.head_dim, device=device, dtype=llm.dtype),
               torch.zeros(n, c.num_kv_heads, c.head_dim, device=device, dtype=llm.dtype)) for _ in range(c.num_layers)]
        batch = AttentionBatch(torch.arange(n, device=device), [SeqSlice(0, n, None)])
        hidden = llm.model(torch.tensor(prompt, device=device), torch.arange(n, device=device), batch, kv)
        return llm.model.compute_logits(hidden[-1:]).float().cpu()[0]


# graphs: decode steps replay CUDA graphs; eager: the paged kernel without graphs; chunked: a 16-token budget,
# so prompt chunks share steps with running decodes (mixed batches).
MODES = {"graphs": {}, "eager": {"enforce_eager": True}, "chunked": {"max_num_batched_tokens": 16}}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["chatglm", "qwen2"])
def test_gpu_fp32_matches_cpu(checkpoints, family, mode):
    cpu = LLM(str(checkpoints[family]), dtype="float32", device="cpu")
    gpu = LLM(str(checkpoints[family]), dtype="float32", device="cuda", **MODES[mode])
    assert gpu.device.type == "cuda" and (gpu.engine.runner.graphs is None) == (mode == "eager")
    expected = [o.token_ids for o in cpu.generate(PROMPTS, GREEDY)]
    assert [o.token_ids for o in gpu.generate(PROMPTS, GREEDY)] == expected
    assert gpu.engine.blocks.num_used == 0


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_gpu_quantized_matches_cpu_kernels(checkpoints, quantization, tmp_path):
    """The Triton int8/int4 kernels compute what PyTorch's CPU kernels compute, from the same weights (a saved
    quantized copy: quantizing on each device could round a few near-tie groups differently)."""
    from glmkit.models.export import save_quantized
    from glmkit.models.quant import QuantPlan, bits_of

    saved = save_quantized(checkpoints["qwen2"], QuantPlan(bits_of(quantization)), tmp_path / quantization)
    cpu, gpu = LLM(str(saved), device="cpu"), LLM(str(saved), device="cuda")
    for prompt in PROMPTS:
        ref, got = first_step_logits(cpu, prompt), first_step_logits(gpu, prompt)
        assert (ref - got).abs().max() <= BF16_TOLERANCE * ref.abs().max()
    assert all(len(o.token_ids) == 24 for o in gpu.generate(PROMPTS, GREEDY))


def test_gpu_int8a8_runs_int8_tensor_cores_close_to_int8(checkpoints):
    """int8a8 on CUDA: the int8 linears take int8 rows (qkv's in two halves) on the int8 tensor cores
    (kernels/int8_matmul.py) in prompts and batched decode steps, close to int8's W8A16 products."""
    from glmkit.models.quant import QuantLinear

    w8a16 = LLM(str(checkpoints["qwen2"]), device="cuda", quantization="int8")
    w8a8 = LLM(str(checkpoints["qwen2"]), device="cuda", quantization="int8a8")
    assert w8a8.resolved_config.quantization == "int8a8"
    halves = {name.rpartition(".")[2]: m._forward.int8_activations for name, m in w8a8.model.named_modules()
              if isinstance(m, QuantLinear)}
    assert halves.pop("qkv") == 2 and set(halves) >= {"o", "gate_up", "down"} and set(halves.values()) == {1}
    for prompt in PROMPTS:
        ref, got = first_step_logits(w8a16, prompt), first_step_logits(w8a8, prompt)
        assert (ref - got).abs().max() <= BF16_TOLERANCE * ref.abs().max()
    outs = w8a8.generate(PROMPTS, GREEDY)  # three rows per decode step: the int8 x int8 kernel in a CUDA graph
    assert all(len(o.token_ids) == 24 for o in outs)
    again = w8a8.generate(PROMPTS, GREEDY)  # each row is quantized on its own range: the same tokens again
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]


@pytest.mark.parametrize("quantization", ["none", "int8", "int8a8", "int4"])
def test_gpu_pdl_changes_no_token(checkpoints, quantization, monkeypatch):
    """With programmatic dependent launch (kernels/pdl.py: quantized models' decode graphs, from compute
    capability 9) each kernel of a step starts while the previous one finishes and waits for its inputs: graphs
    captured with it and without it give the same tokens, prompt and decode, single row and batched."""
    outs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("GLMKIT_PDL", flag)
        llm = LLM(str(checkpoints["qwen2"]), device="cuda", quantization=quantization)
        assert llm.engine.runner.graphs.quantized == (quantization != "none")
        outs[flag] = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        outs[flag + "-one"] = [o.token_ids for o in llm.generate(PROMPTS[1:2], GREEDY)]
    assert outs["0"] == outs["1"] and outs["0-one"] == outs["1-one"]


@pytest.mark.parametrize("family", ["chatglm", "qwen2"])
def test_gpu_bf16_within_tolerance(checkpoints, family):
    cpu = LLM(str(checkpoints[family]), dtype="float32", device="cpu")
    gpu = LLM(str(checkpoints[family]), device="cuda")  # auto: bf16 on GPU
    assert gpu.dtype == torch.bfloat16
    for prompt in PROMPTS:
        ref, got = first_step_logits(cpu, prompt), first_step_logits(gpu, prompt)
        assert (ref - got).abs().max() <= BF16_TOLERANCE * ref.abs().max()
    outs = gpu.generate(PROMPTS, GREEDY)
    assert all(len(o.token_ids) == 24 for o in outs)


def test_gpu_sampling_seeded_and_preemption(checkpoints):
    gpu = LLM(str(checkpoints["chatglm"]), dtype="float32", device="cuda", kv_cache_memory_gb=6 * 16 * 512 / 2**30)
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=24, seed=3, ignore_eos=True)
    a = gpu.generate(PROMPTS, p)
    b = gpu.generate(PROMPTS, p)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert gpu.engine.scheduler.num_preemptions > 0 and gpu.engine.blocks.num_used == 0


def test_gpu_lookahead_matches_cpu(checkpoints):
    """With CUDA graphs the runner launches each decode step ahead; sequences finishing at different steps and a
    request arriving mid-run still give the CPU's tokens, and the steps launched ahead are the ones used."""
    cpu = LLM(str(checkpoints["chatglm"]), dtype="float32", device="cpu")
    gpu = LLM(str(checkpoints["chatglm"]), dtype="float32", device="cuda")
    assert gpu.engine.runner.lookahead

    from test_lookahead import drive

    def run(llm):
        engine = llm.engine
        for i, n in enumerate((5, 30, 17)):
            engine.add_request(PROMPTS[i], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), f"r{i}")
        late = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
        return drive(engine, {8: lambda: engine.add_request(PROMPTS[0], late, "late")})

    expected = run(cpu)
    calls = []
    real = gpu.engine.runner._logits
    gpu.engine.runner._logits = lambda rows: calls.append(len(rows)) or real(rows)
    assert run(gpu) == expected
    assert calls == [3, 1]  # the first prompts, then the late one alone: every decode step was launched ahead
    assert gpu.engine.blocks.num_used == 0


def test_gpu_decode_step_waits_only_for_its_tokens(checkpoints):
    """A steady decode step (graph replay launched ahead, sampling, reading the ids back) makes no stream
    synchronisation: the host waits on the event of the ids' copy alone."""
    import warnings

    gpu = LLM(str(checkpoints["qwen2"]), device="cuda")
    engine = gpu.engine
    engine.add_request(PROMPTS[1], SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True), "r")
    for _ in range(4):
        engine.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deltas = engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(deltas) == 1 and len(deltas[0].token_ids) == 1
    assert [str(w.message) for w in caught if "synchroniz" in str(w.message)] == []


def test_gpu_prefix_cache_hits_match_cpu(checkpoints):
    """A prompt whose first blocks are in the prefix cache attends over the paged cache (kernels/paged_prefill.py)
    and still gives the CPU's tokens."""
    long_prompt = list(range(100, 160))
    follow_ups = [long_prompt + [7, 8, 9], long_prompt[:40] + [11, 12], long_prompt + [7, 8, 9, 10, 11]]
    results = []
    for device in ("cpu", "cuda"):
        llm = LLM(str(checkpoints["qwen2"]), dtype="float32", device=device)
        llm.generate([long_prompt], GREEDY)
        results.append([o.token_ids for o in llm.generate(follow_ups, GREEDY)])
        assert llm.engine.blocks.num_hit_blocks >= 3 + 2 + 3
    assert results[1] == results[0]


def test_gpu_constrained_rows_match_cpu_beside_free_ones(checkpoints):
    """A constrained row (its bitmask moved to the GPU and applied before sampling) in a batch with free rows,
    with CUDA graphs and steps launched ahead: the same tokens as on the CPU, and valid JSON."""
    import json

    from glmkit.engine.structured import StructuredOutput

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"],
              "additionalProperties": False}
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=40, structured=StructuredOutput.json_schema(schema)),
              GREEDY]
    outs = {}
    for device in ("cpu", "cuda"):
        llm = LLM(str(checkpoints["qwen2"]), dtype="float32", device=device)
        outs[device] = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    assert [o.token_ids for o in outs["cuda"]] == [o.token_ids for o in outs["cpu"]]
    value = json.loads(outs["cuda"][1].text)
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99


@pytest.mark.parametrize("family", ["chatglm", "qwen2"])
def test_gpu_training_forward_matches_cpu_and_a_lora_learns(checkpoints, family):
    """The training path on CUDA (eager, and compiled with recomputation) computes the CPU's loss in fp32, and a
    few LoRA steps on it bring a sample's loss down."""
    from glmkit.finetune.data import Sample
    from glmkit.finetune.train import TrainConfig, Trainer
    from glmkit.models import training
    from glmkit.models.loader import load_model, read_config
    from glmkit.models.lora import LoraConfig, checkpoint_names

    model_dir = checkpoints[family]
    _, config = read_config(model_dir)
    ids = torch.tensor([[5, 17, 33, 64, 101, 7, 9, 40, 11, 12]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    losses = {}
    for device, recompute, compiled in (("cpu", False, False), ("cuda", False, False), ("cuda", True, True)):
        model = load_model(model_dir, config, torch.float32, torch.device(device))
        positions, _ = training.positions_and_mask([[ids.shape[1]]], ids.shape[1], device)
        hidden = training.hidden_states(model, ids.to(device), positions, recompute=recompute, compiled=compiled)
        losses[(device, compiled)] = training.target_loss(model, hidden, ids.to(device), mask.to(device)).item()
    assert losses[("cuda", False)] == pytest.approx(losses[("cpu", False)], rel=1e-4)
    assert losses[("cuda", True)] == pytest.approx(losses[("cpu", False)], rel=1e-4)

    model = load_model(model_dir, config, torch.bfloat16, torch.device("cuda"))
    sample = Sample(ids[0].tolist(), [False] + [True] * (ids.shape[1] - 1), "gpu")
    cfg = TrainConfig(lora=LoraConfig(r=8, alpha=16), learning_rate=1e-2, batch_size=1, max_steps=8, recompute=True,
                      compiled=True)
    trainer = Trainer(model, checkpoint_names(model_dir), "tiny", cfg, model_dir / "unused", [sample])
    curve = [trainer.train_step()["loss"] for _ in range(8)]
    assert curve[-1] < curve[0] / 2, curve


def test_gpu_served_adapters_match_cpu(checkpoints, tmp_path):
    """LoRA and P-Tuning adapters on the GPU (LoRA weights in GPU slots, decode steps with adapter rows in their
    own CUDA graphs with the LoRA kernel, paged prefill over a pinned prefix) give the CPU's greedy tokens, alone
    and mixed with the base in one batch; with one slot for two LoRAs too (swapped in, a step in two passes)."""
    import threading

    from adapter_fixtures import make_adapter, make_prefix

    d = checkpoints["chatglm"]
    adapters = {"lora": str(make_adapter(d, tmp_path / "lora", ["all-linear"], 8, seed=1)),
                "qkv": str(make_adapter(d, tmp_path / "qkv", ["query_key_value"], 4, seed=3)),
                "prefix": str(make_prefix(d, tmp_path / "prefix", 16, True, seed=2))}
    outputs = {}
    for device, slots in (("cpu", 8), ("cuda", 8), ("cuda", 1)):
        llm = LLM(str(d), dtype="float32", device=device, adapters=adapters, max_gpu_adapters=slots)
        llm.start_engine_thread()
        results = {}
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, [
            o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, adapter=n)])) for n in (None, *adapters)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outputs[device, slots] = results
        if device == "cuda":
            assert llm.engine.runner.adapters.pooled and llm.engine.runner.graphs.replays["lora"] > 0
    assert outputs["cuda", 8] == outputs["cpu", 8]
    assert outputs["cuda", 1] == outputs["cpu", 8]
    assert len({tuple(map(tuple, v)) for v in outputs["cpu", 8].values()}) == 4