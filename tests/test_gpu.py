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
