"""glmkit against the ORIGINAL ChatGLM2/ChatGLM3 remote code, token for token.

tests/golden/chatglm_reference.json holds what the original `modeling_chatglm.py` / `tokenization_chatglm.py`
produced (transformers 4.40.2, torch CPU, float32) on tiny random checkpoints; make_chatglm_reference.py next to
it documents how. This test rebuilds the same checkpoints with the fixture builders and checks that glmkit
gives the same prompt ids (render_chat vs build_chat_input / build_prompt), the same greedy ids (with and
without stop tokens, single and batched) and the same first-step logits. Needs only glmkit's venv.
"""

from __future__ import annotations

import pytest
import torch

from golden_support import GOLDEN, MAX_NEW, assert_ids, golden_checkpoint, without_stop

CHECKPOINTS = list(GOLDEN["checkpoints"])


_LLMS: dict[str, object] = {}


@pytest.fixture(scope="module")
def llm_for(reference_sp_model, tmp_path_factory):
    from glmkit import LLM

    def get(name: str):
        if name not in _LLMS:
            _, out = golden_checkpoint(name, reference_sp_model, tmp_path_factory.mktemp(name))
            _LLMS[name] = LLM(str(out), dtype="float32", device="cpu", kv_cache_memory_gb=0.01)
        return _LLMS[name]

    yield get
    _LLMS.clear()


def _prompts(name: str) -> list[tuple[str, dict]]:
    return list(GOLDEN["checkpoints"][name]["prompts"].items())


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_chat_prompt_ids_match_original_tokenizer(llm_for, name):
    llm = llm_for(name)
    expected_format = GOLDEN["checkpoints"][name]["family"]
    assert llm.chat_format.name == expected_format
    for prompt, ref in _prompts(name):
        assert_ids(llm.render_chat(ref["messages"]), ref["prompt_ids"], f"{name}/{prompt} prompt ids")


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_ids_without_eos_match_original(llm_for, name):
    from glmkit import SamplingParams

    llm = llm_for(name)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    prompts = _prompts(name)
    batched = llm.generate([ref["prompt_ids"] for _, ref in prompts], params)
    for (prompt, ref), out in zip(prompts, batched):
        assert_ids(out.outputs[0].token_ids, ref["greedy_no_eos"], f"{name}/{prompt} greedy, batched")
    prompt, ref = max(prompts, key=lambda p: len(p[1]["prompt_ids"]))  # the longest, alone in the engine
    single = llm.generate([ref["prompt_ids"]], params)[0].outputs[0].token_ids
    assert_ids(single, ref["greedy_no_eos"], f"{name}/{prompt} greedy, single")


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_ids_with_eos_match_original(llm_for, name):
    from glmkit import SamplingParams

    llm = llm_for(name)
    prompts = _prompts(name)
    outs = llm.generate([ref["prompt_ids"] for _, ref in prompts], SamplingParams(temperature=0, max_tokens=MAX_NEW))
    for (prompt, ref), out in zip(prompts, outs):
        want, reason = without_stop(ref["greedy_eos_2"], {2})
        assert_ids(out.outputs[0].token_ids, want, f"{name}/{prompt} greedy with eos 2")
        assert out.outputs[0].finish_reason == reason, f"{name}/{prompt}"


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_chat_stop_tokens_match_original(llm_for, name):
    """llm.chat stops where the original chat()'s eos list ([eos, <|user|>, <|observation|>] for ChatGLM3) does."""
    from glmkit import SamplingParams

    llm = llm_for(name)
    prompts = _prompts(name)
    outs = llm.chat([ref["messages"] for _, ref in prompts], SamplingParams(temperature=0, max_tokens=MAX_NEW))
    for (prompt, ref), out in zip(prompts, outs):
        want, reason = without_stop(ref["greedy_chat_stop"], set(ref["chat_stop_ids"]))
        assert_ids(out.outputs[0].token_ids, want, f"{name}/{prompt} chat stop tokens")
        assert out.outputs[0].finish_reason == reason, f"{name}/{prompt}"


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_first_step_logits_match_original(llm_for, name):
    """Top-5 next-token logits after the prompt (a numeric check below the argmax). Drives the decoder through
    its slot-addressed attention directly, with no past."""
    from glmkit.models.layers import AttentionBatch, SeqSlice

    llm = llm_for(name)
    model, runner = llm.engine.runner.model, llm.engine.runner
    for prompt, ref in _prompts(name):
        n = len(ref["prompt_ids"])
        batch = AttentionBatch(slot_mapping=torch.arange(n), seqs=[SeqSlice(0, n, None)])
        with torch.inference_mode():
            hidden = model(torch.tensor(ref["prompt_ids"]), torch.arange(n), batch, runner.kv_caches)
            logits = model.compute_logits(hidden[-1:])[0]
        top = torch.topk(logits, 5)
        assert top.indices.tolist() == ref["first_step_top5_ids"], f"{name}/{prompt}"
        torch.testing.assert_close(top.values, torch.tensor(ref["first_step_top5_logits"]), atol=1e-4, rtol=0,
                                   msg=lambda m: f"{name}/{prompt}: {m}")
