"""The engine on a tiny ChatGLM checkpoint: prefix caching, chunked prefill, random aborts, the async loop,
logprobs, and the streaming detokenizer."""

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint_fixtures import make_chatglm_dir
from glmkit import LLM, SamplingParams
from glmkit.engine.async_engine import AsyncLLMEngine
from glmkit.engine.detokenizer import IncrementalDetokenizer
from glmkit.errors import ContextLengthError

SYSTEM = list(range(40, 90))  # a 50-token shared prefix


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, sp_model_path, sp):
    return make_chatglm_dir(tmp_path_factory.mktemp("tiny"), sp_model_path, sp.vocab_size, seed=11)


def make_llm(tiny_dir, **kwargs):
    return LLM(str(tiny_dir), dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return make_llm(tiny_dir)


def greedy(n=12):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def prompts():
    rng = random.Random(0)
    return [SYSTEM + [rng.randrange(3, 400) for _ in range(rng.randrange(1, 30))] for _ in range(6)]


def test_prefix_cache_hits_give_identical_tokens(tiny_dir, llm):
    no_cache = make_llm(tiny_dir, enable_prefix_caching=False)
    expected = [o.token_ids for o in no_cache.generate(prompts(), greedy())]
    llm.generate([SYSTEM + [5]], greedy(1))  # warm the cache with the shared prefix
    hits_before = llm.engine.blocks.num_hit_blocks
    assert [o.token_ids for o in llm.generate(prompts(), greedy())] == expected
    assert llm.engine.blocks.num_hit_blocks - hits_before >= 6 * 3  # three full 16-token blocks per prompt
    assert llm.engine.counters()["prefix_cache_hit_rate"] > 0


def test_multi_turn_chat_reuses_the_previous_turn(llm):
    turn1 = SYSTEM + list(range(200, 240))
    reply = llm.generate([turn1], greedy(20))[0].token_ids
    before = llm.engine.blocks.num_hit_blocks
    llm.generate([turn1 + reply + [300, 301]], greedy(4))
    assert llm.engine.blocks.num_hit_blocks - before >= len(turn1 + reply) // 16 - 1


def test_chunked_prefill_and_preemption_give_identical_tokens(tiny_dir, llm):
    expected = [o.token_ids for o in llm.generate(prompts(), greedy(24))]
    chunked = make_llm(tiny_dir, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert [o.token_ids for o in chunked.generate(prompts(), greedy(24))] == expected
    tight = make_llm(tiny_dir, kv_cache_memory_gb=8 * 16 * 1024 / 2**30, max_num_batched_tokens=16)
    assert [o.token_ids for o in tight.generate(prompts(), greedy(24))] == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.blocks.num_used == 0
    for other in (chunked, tight):  # decode steps launched ahead, beside prompt chunks and preemption
        other.engine.runner.lookahead = True
        assert [o.token_ids for o in other.generate(prompts(), greedy(24))] == expected
        assert other.engine.blocks.num_used == 0


@pytest.mark.parametrize("lookahead", [False, True])
def test_thousand_random_aborts_leave_no_blocks(llm, lookahead, monkeypatch):
    engine, rng = llm.engine, random.Random(1)
    monkeypatch.setattr(engine.runner, "lookahead", lookahead)
    live: list[str] = []
    for i in range(1000):
        prompt = (SYSTEM if rng.random() < 0.5 else []) + [rng.randrange(3, 400) for _ in range(rng.randrange(1, 40))]
        seed = None if lookahead else i  # seeded rows are sampled one by one and never run ahead
        engine.add_request(prompt, SamplingParams(temperature=0.8, max_tokens=rng.randrange(1, 30), seed=seed),
                           f"r{i}")
        live.append(f"r{i}")
        if rng.random() < 0.3:
            engine.step()
        if rng.random() < 0.9:
            engine.abort(live.pop(rng.randrange(len(live))))
    for request_id in live:
        engine.abort(request_id)
    assert not engine.has_unfinished() and not engine.seqs
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)


def test_logprobs(llm):
    out = llm.generate([SYSTEM], SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True))[0]
    choice = out.outputs[0]
    assert [t for t, _, _ in choice.logprobs] == choice.token_ids
    for token, logprob, top in choice.logprobs:
        assert len(top) == 4 and top[0][0] == token and top[0][1] == pytest.approx(logprob)
        assert all(a[1] >= b[1] for a, b in zip(top, top[1:])) and logprob <= 0


@pytest.mark.parametrize("lookahead", [False, True])
def test_async_engine_streams_concurrently_and_cancels(llm, lookahead, monkeypatch):
    monkeypatch.setattr(llm.engine.runner, "lookahead", lookahead)

    async def main():
        engine = AsyncLLMEngine(llm.engine)
        try:
            async def collect(prompt):
                ids = []
                async for delta in engine.generate(prompt, greedy(10)):
                    ids += delta.token_ids
                    if delta.finished:
                        assert delta.num_output_tokens == 10 and delta.num_prompt_tokens == len(prompt)
                return ids

            async def cancelled():
                async for delta in engine.generate(SYSTEM + [9], SamplingParams(max_tokens=500, ignore_eos=True)):
                    if len(delta.token_ids):
                        break  # leaving the stream aborts the request

            results = await asyncio.gather(*(collect(p) for p in prompts()), cancelled())
            with pytest.raises(ContextLengthError):
                async for _ in engine.generate([5] * 3000, greedy()):
                    pass
            still_ok = await collect(prompts()[0])
            for _ in range(100):  # the abort is processed by the engine thread
                if llm.engine.blocks.num_used == 0:
                    break
                await asyncio.sleep(0.01)
            return results, still_ok
        finally:
            engine.shutdown()

    results, still_ok = asyncio.run(main())
    expected = [o.token_ids for o in llm.generate(prompts(), greedy(10))]
    assert results[:-1] == expected and still_ok == expected[0]
    assert llm.engine.blocks.num_used == 0


chinese = st.text(alphabet=st.sampled_from(list("你好世界，。！天气怎么样abc 12\n😀")), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(text=chinese, data=st.data())
def test_detokenizer_deltas_add_up(sp, g4, hf, text, data):
    for tokenizer in (sp, g4, hf):
        ids = tokenizer.encode(text)
        ids += data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=8))
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        pieces, i = [], 0
        while i < len(ids):
            step = data.draw(st.integers(1, 3))
            pieces.append(detok.add(ids[i:i + step], final=i + step >= len(ids)))
            assert not pieces[-1].endswith("\ufffd") or i + step >= len(ids)
            i += step
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_temperature_zero_equals_argmax_of_logits(llm):
    from glmkit.models.layers import AttentionBatch, SeqSlice

    prompt = SYSTEM[:7]
    with torch.inference_mode():
        kv = [(torch.zeros(7, 2, 16), torch.zeros(7, 2, 16)) for _ in llm.model.layers]
        hidden = llm.model(torch.tensor(prompt), torch.arange(7), AttentionBatch(torch.arange(7), [SeqSlice(0, 7, None)]), kv)
        expected = int(llm.model.compute_logits(hidden[-1:]).argmax())
    assert llm.generate([prompt], greedy(1))[0].token_ids == [expected]


def test_llm_calls_go_through_the_engine_thread_once_it_serves(glm_dir):
    """An LLM whose engine is stepped by the serving thread: its own generate/chat/stream_chat calls, from other
    threads at the same time, go through that thread and never race it."""
    llm = LLM(str(glm_dir), dtype="float32", device="cpu")
    expected = [o.token_ids for o in llm.generate(prompts(), greedy(12))]
    messages = [{"role": "user", "content": "你好"}]
    expected_chat = llm.chat(messages, greedy(8))[0].token_ids
    serving = llm.start_engine_thread()
    assert llm.start_engine_thread() is serving

    async def served():
        async def one(prompt):
            ids = []
            async for delta in serving.generate(prompt, greedy(12)):
                ids += delta.token_ids
            return ids
        return await asyncio.gather(*(one(p) for p in prompts() * 3))

    def stream_then_leave():
        pieces = llm.stream_chat(messages, SamplingParams(max_tokens=400, ignore_eos=True))
        next(pieces)
        pieces.close()  # aborts the request on the engine thread

    try:
        with ThreadPoolExecutor(3) as pool:
            direct = [pool.submit(lambda: [o.token_ids for o in llm.generate(prompts(), greedy(12))])
                      for _ in range(2)]
            chat = pool.submit(lambda: llm.chat(messages, greedy(8))[0].token_ids)
            left = pool.submit(stream_then_leave)
            from_loop = asyncio.run(served())
            assert [f.result(timeout=60) for f in direct] == [expected, expected]
            assert chat.result(timeout=60) == expected_chat
            left.result(timeout=60)
        assert from_loop == expected * 3
        snapshot = serving.call(lambda engine: engine.snapshot()).result(timeout=10)
        for _ in range(100):  # the abort of the abandoned stream reaches the engine thread
            if snapshot.gauges["kv_blocks_used"] == 0:
                break
            time.sleep(0.01)
            snapshot = serving.call(lambda engine: engine.snapshot()).result(timeout=10)
        assert snapshot.gauges["kv_blocks_used"] == 0 and snapshot.gauges["requests_running"] == 0
    finally:
        serving.shutdown()
