"""Serving ChatGLM P-Tuning v2 adapters against the ORIGINAL ChatGLM2/ChatGLM3 remote code, token for token.

The "ptuning" key of tests/golden/chatglm_reference.json holds the greedy ids the original `modeling_chatglm.py`
gave (transformers 4.40.2, torch CPU, float32) on the tiny checkpoints of test_reference_chatglm.py with a random
prefix (checkpoint_fixtures.random_prefix_state) loaded into `transformer.prefix_encoder`, pre_seq_len 16 and 32
(the latter with prefix_projection); make_chatglm_reference.py documents how. This test rebuilds the same base
checkpoints and prefix directories (ChatGLM's ptuning output: config.json + pytorch_model.bin) and checks that
glmkit, serving the prefix as an adapter, gives the same ids (with and without eos, batched and alone), that the
prefix changes the answer, and that a batch mixing the base model and the adapters gives each request its own.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from checkpoint_fixtures import make_prefix_dir, random_prefix_state
from golden_support import GOLDEN, MAX_NEW, assert_ids, golden_checkpoint, state_sha256, without_stop

PTUNING = GOLDEN["ptuning"]


def _adapter_name(entry: dict) -> str:
    return f"pt{entry['pre_seq_len']}" + ("proj" if entry["projection"] else "")


def _case_key(entry: dict) -> tuple[str, str]:
    return entry["checkpoint"], _adapter_name(entry)


# (checkpoint, adapter name) -> the golden entries (one per prompt), in file order
CASES: dict[tuple[str, str], list[dict]] = {}
for _entry in PTUNING:
    CASES.setdefault(_case_key(_entry), []).append(_entry)
CHECKPOINTS = list(dict.fromkeys(name for name, _ in CASES))
CASE_IDS = [f"{name}-{adapter}" for name, adapter in CASES]


_LLMS: dict[str, object] = {}


@pytest.fixture(scope="module")
def llm_for(reference_sp_model, tmp_path_factory):
    """One engine per base checkpoint, serving all of its P-Tuning adapters (named pt16, pt32proj, ...)."""
    from glmkit import LLM

    def get(name: str):
        if name not in _LLMS:
            root = tmp_path_factory.mktemp(name)
            config, base = golden_checkpoint(name, reference_sp_model, root / "base")
            adapters = {}
            for (ckpt, adapter), entries in CASES.items():
                if ckpt != name:
                    continue
                e = entries[0]
                state = random_prefix_state(config, e["pre_seq_len"], e["projection"], e["seed"])
                if state_sha256(state) != e["prefix_sha256"]:
                    pytest.fail("checkpoint_fixtures.random_prefix_state no longer gives the golden prefix; "
                                "regenerate tests/golden/chatglm_reference.json with make_chatglm_reference.py")
                adapters[adapter] = str(make_prefix_dir(root / adapter, config, state, e["pre_seq_len"],
                                                        e["projection"]))
            _LLMS[name] = LLM(str(base), dtype="float32", device="cpu", kv_cache_memory_gb=0.01, adapters=adapters)
        return _LLMS[name]

    yield get
    _LLMS.clear()


def _base_ref(entry: dict) -> dict:
    return GOLDEN["checkpoints"][entry["checkpoint"]]["prompts"][entry["prompt"]]


def _greedy(**kw):
    from glmkit.engine.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, **kw)


def test_golden_ptuning_cases_are_complete():
    assert {e["pre_seq_len"] for e in PTUNING} >= {16, 32}
    assert any(e["projection"] for e in PTUNING) and not all(e["projection"] for e in PTUNING)
    assert {GOLDEN["checkpoints"][name]["family"] for name in CHECKPOINTS} == {"chatglm2", "chatglm3"}
    for e in PTUNING:  # the reference itself: same prompt as the base case, a clearly different answer
        assert e["prompt_ids"] == _base_ref(e)["prompt_ids"]
        assert sum(a != b for a, b in zip(e["greedy_no_eos"], _base_ref(e)["greedy_no_eos"])) >= MAX_NEW // 2


@pytest.mark.parametrize("case", list(CASES), ids=CASE_IDS)
def test_ptuning_greedy_ids_without_eos_match_original(llm_for, case):
    name, adapter = case
    llm, entries = llm_for(name), CASES[case]
    params = _greedy(ignore_eos=True)
    batched = llm.generate([e["prompt_ids"] for e in entries], params, adapter=adapter)
    for e, out in zip(entries, batched):
        assert_ids(out.outputs[0].token_ids, e["greedy_no_eos"], f"{name}/{adapter}/{e['prompt']} greedy, batched")
    e = max(entries, key=lambda e: len(e["prompt_ids"]))  # the longest, alone in the engine
    single = llm.generate([e["prompt_ids"]], params, adapter=adapter)[0].outputs[0].token_ids
    assert_ids(single, e["greedy_no_eos"], f"{name}/{adapter}/{e['prompt']} greedy, single")


@pytest.mark.parametrize("case", list(CASES), ids=CASE_IDS)
def test_ptuning_greedy_ids_with_eos_match_original(llm_for, case):
    name, adapter = case
    llm, entries = llm_for(name), CASES[case]
    outs = llm.generate([e["prompt_ids"] for e in entries], _greedy(), adapter=adapter)
    for e, out in zip(entries, outs):
        want, reason = without_stop(e["greedy_eos_2"], {2})
        assert_ids(out.outputs[0].token_ids, want, f"{name}/{adapter}/{e['prompt']} greedy with eos 2")
        assert out.outputs[0].finish_reason == reason, f"{name}/{adapter}/{e['prompt']}"


@pytest.mark.parametrize("case", list(CASES), ids=CASE_IDS)
def test_ptuning_chat_stop_tokens_match_original(llm_for, case):
    """llm.chat with the adapter stops where the original chat()'s eos list does."""
    name, adapter = case
    llm, entries = llm_for(name), CASES[case]
    outs = llm.chat([e["messages"] for e in entries], _greedy(), adapter=adapter)
    for e, out in zip(entries, outs):
        want, reason = without_stop(e["greedy_chat_stop"], set(e["chat_stop_ids"]))
        assert_ids(out.outputs[0].token_ids, want, f"{name}/{adapter}/{e['prompt']} chat stop tokens")
        assert out.outputs[0].finish_reason == reason, f"{name}/{adapter}/{e['prompt']}"


@pytest.mark.parametrize("case", list(CASES), ids=CASE_IDS)
def test_the_prefix_changes_the_answer(llm_for, case):
    """The same engine without the adapter gives the base model's (golden) ids, which differ from the adapter's."""
    name, adapter = case
    llm, entries = llm_for(name), CASES[case]
    params = _greedy(ignore_eos=True)
    base = llm.generate([e["prompt_ids"] for e in entries], params)
    tuned = llm.generate([e["prompt_ids"] for e in entries], params, adapter=adapter)
    for e, b, t in zip(entries, base, tuned):
        assert_ids(b.outputs[0].token_ids, _base_ref(e)["greedy_no_eos"], f"{name}/{e['prompt']} base model")
        assert t.outputs[0].token_ids != b.outputs[0].token_ids, f"{name}/{adapter}/{e['prompt']}: prefix ignored"


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_a_mixed_batch_gives_each_request_its_own_tokens(llm_for, name):
    """The base model and every P-Tuning adapter of the checkpoint, interleaved in one engine step after another:
    each request gets the ids the original gave it alone."""
    llm, engine = llm_for(name), llm_for(name).engine
    params = _greedy(ignore_eos=True)
    adapters = [adapter for ckpt, adapter in CASES if ckpt == name]
    prompts = list(dict.fromkeys(e["prompt"] for (ckpt, _), entries in CASES.items() if ckpt == name
                                 for e in entries))
    by_prompt = {(_adapter_name(e), e["prompt"]): e for e in PTUNING if e["checkpoint"] == name}
    base_prompts = GOLDEN["checkpoints"][name]["prompts"]
    jobs = [(prompt, adapter) for prompt in prompts for adapter in [None, *adapters]]
    out: dict[str, list[int]] = {}
    for i, (prompt, adapter) in enumerate(jobs):
        engine.add_request(base_prompts[prompt]["prompt_ids"], replace(params, adapter_id=llm.adapter_id(adapter)),
                           f"mixed-{i}")
        out[f"mixed-{i}"] = []
    while engine.has_unfinished():
        for d in engine.step():
            out[d.request_id] += d.token_ids
    for i, (prompt, adapter) in enumerate(jobs):
        want = (base_prompts[prompt] if adapter is None else by_prompt[(adapter, prompt)])["greedy_no_eos"]
        assert_ids(out[f"mixed-{i}"], want, f"{name}/{adapter or 'base'}/{prompt} in a mixed batch")
