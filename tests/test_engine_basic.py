"""Generation behaviour on a tiny ChatGLM checkpoint: batching, sampling, stops, limits, abort, preemption."""

import logging

import pytest

from checkpoint_fixtures import make_chatglm_dir
from glmkit import LLM, SamplingParams
from glmkit.errors import InvalidParameterError

PROMPTS = [[5, 17, 33], [64, 101, 7, 250, 3, 90, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [300, 301]]


@pytest.fixture(scope="module")
def llm(glm_dir):
    return LLM(str(glm_dir), dtype="float32", device="cpu")


def greedy(n=10):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def test_batch_equals_single(llm):
    batched = [o.token_ids for o in llm.generate(PROMPTS, greedy())]
    single = [llm.generate([p], greedy())[0].token_ids for p in PROMPTS]
    assert batched == single
    assert all(len(ids) == 10 for ids in batched)


def test_preemption_keeps_outputs_identical(glm_dir, llm):
    expected = [o.token_ids for o in llm.generate(PROMPTS, greedy(24))]
    # Room for ~3 blocks of 16 tokens (384 bytes/token): sequences must be preempted and recomputed.
    small = LLM(str(glm_dir), dtype="float32", device="cpu", kv_cache_memory_gb=3 * 16 * 1024 / 2**30)
    assert [o.token_ids for o in small.generate(PROMPTS, greedy(24))] == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.blocks.num_free == small.engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p)[0].token_ids
    crowded = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [SamplingParams(temperature=1.0, max_tokens=12), p,
                                                                  SamplingParams(temperature=0.7, max_tokens=5)])
    assert crowded[1].token_ids == alone
    other = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=99, ignore_eos=True))
    assert other[0].token_ids != alone


def test_temperature_zero_is_argmax(llm):
    import torch

    from glmkit.models.layers import AttentionBatch, SeqSlice

    prompt = PROMPTS[1]
    first = llm.generate([prompt], greedy(1))[0].token_ids[0]
    with torch.inference_mode():
        ids = torch.tensor(prompt)
        kv = [(torch.zeros(len(prompt), 2, 16), torch.zeros(len(prompt), 2, 16)) for _ in llm.model.layers]
        batch = AttentionBatch(torch.arange(len(prompt)), [SeqSlice(0, len(prompt), None)])
        logits = llm.model.compute_logits(llm.model(ids, torch.arange(len(prompt)), batch, kv)[-1:])
    assert first == int(logits.argmax())


def test_max_tokens_gives_length(llm):
    out = llm.generate([PROMPTS[0]], greedy(3))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_stop_token_ids(llm):
    full = llm.generate([PROMPTS[0]], greedy(10))[0].token_ids
    stop_id = full[4]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    assert out.token_ids == full[: full.index(stop_id)]


def test_stop_string_cuts_text(llm):
    full = llm.generate([PROMPTS[1]], greedy(16))[0].text
    assert len(full) > 6
    stop = full[3:6]
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == full[: full.index(stop)]


def test_n_choices(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request(PROMPTS[1], greedy(50), "r1")
    engine.add_request(PROMPTS[0], greedy(50), "r2")
    engine.step()
    engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    engine.abort("r1")
    engine.abort("r2")
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished()


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_k", -5), ("max_tokens", 0),
                                         ("n", 0), ("presence_penalty", 3), ("stop", [""]), ("min_p", 2)])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidParameterError, match=field):
        SamplingParams(**{field: value})


def test_bad_prompt_ids(llm):
    with pytest.raises(InvalidParameterError, match="token ids must be in"):
        llm.generate([[10**7]])


def test_equal_length_prompts_batched_attention_matches_one_by_one(tmp_path, sp_model_path, sp, monkeypatch):
    """Prompts of one length arriving together are attended in one call; the tokens equal running each alone."""
    from glmkit.models import layers

    d = make_chatglm_dir(tmp_path / "glm", sp_model_path, sp.vocab_size, seed=31)
    llm = LLM(str(d), dtype="float32", device="cpu", enable_prefix_caching=False)
    prompts = [[5 + i, 17, 33, 64, 101, 7, 250] for i in range(4)] + [[9, 8, 7]]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    counts = []
    real = layers.attend_prompts
    monkeypatch.setattr(layers, "attend_prompts", lambda q, k, v: counts.append(q.shape[0]) or real(q, k, v))
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert counts and set(counts) == {4}  # the four 7-token prompts, once per layer
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_the_resolved_configuration_is_logged_once(glm_dir, caplog):
    with caplog.at_level(logging.INFO, logger="glmkit"):
        llm = LLM(str(glm_dir), kv_cache_memory_gb=0.25)  # dtype, device, format, length: all "auto"
    lines = [r.getMessage() for r in caplog.records if "max_num_seqs=" in r.getMessage()]
    assert len(lines) == 1
    for part in ("device=cpu", "dtype=float32", "chat_format=chatglm3", "quantization=none",
                 f"max_model_len={llm.engine.max_model_len}", "kv_cache_memory_gb=0.25", f"model={glm_dir}"):
        assert part in lines[0], (part, lines[0])
