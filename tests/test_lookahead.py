"""Running a decode step ahead (runner.lookahead): the outputs are exactly those of running step by step, whatever
happens between steps (sequences finishing, stopping on strings, new requests, aborts, preemption, the length
limit), and the step computed ahead is actually used, also beside new prompts. On CPU the ahead step runs
eagerly, so the bookkeeping is tested here; the GPU tests run it with CUDA graphs, where it is on by default."""

import pytest

from glmkit import LLM, SamplingParams
from test_engine_basic import PROMPTS


@pytest.fixture(scope="module")
def llm(glm_dir):
    return LLM(str(glm_dir), dtype="float32", device="cpu")


def drive(engine, events: dict | None = None) -> dict[str, list[int]]:
    """Step `engine` until it is idle, calling events[k]() after the k-th step -> token ids per request."""
    tokens, steps = {}, 0
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        steps += 1
        if events and steps in events:
            events[steps]()
    return tokens


def both(llm, fn):
    """fn() with lookahead off, then on; also the forward passes the engine asked for with it on (the number of
    sequences in each)."""
    runner = llm.engine.runner
    assert not runner.lookahead  # off by default without CUDA graphs
    off = fn()
    calls = []
    real = runner._logits
    runner._logits = lambda rows: calls.append(len(rows)) or real(rows)
    runner.lookahead = True
    try:
        on = fn()
    finally:
        runner.lookahead = False
        del runner._logits
        runner._ahead = None
    return off, on, calls


def outputs(results):
    return [(o.token_ids, o.text, o.finish_reason) for o in results]


def test_same_outputs_and_the_steps_ahead_are_used(llm):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 17, 9)]
    off, on, forwards = both(llm, lambda: outputs(llm.generate(PROMPTS, params)))
    assert on == off
    assert [len(ids) for ids, _, _ in on] == [3, 17, 9]
    assert forwards == [3]  # the prefill; every later step was launched ahead (the first two finish on the way)


def test_stops_and_stop_strings(llm):
    reference = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stop_id = reference[1].token_ids[4]
    stop_text = reference[0].text[2:5] if len(reference[0].text) > 5 else None
    params = [SamplingParams(temperature=0, max_tokens=12, stop=[stop_text] if stop_text else None),
              SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]),
              SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=[stop_id], ignore_eos=True)]
    off, on, _ = both(llm, lambda: outputs(llm.generate(PROMPTS, params)))
    assert on == off
    assert off[1][2] == "stop"


def test_requests_arriving_and_aborted_between_steps(llm):
    def run():
        engine = llm.engine
        engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), "a")
        engine.add_request(PROMPTS[2], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), "c")
        late = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        return drive(engine, {4: lambda: engine.add_request(PROMPTS[1], late, "b"), 7: lambda: engine.abort("c")})

    off, on, forwards = both(llm, run)
    assert on == off
    assert forwards == [2, 1]  # the first prompts, then the late one alone: the running decodes were ahead
    assert len(off["a"]) == 20 and len(off["b"]) == 10 and len(off["c"]) < 20
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_preemption(glm_dir):
    small = LLM(str(glm_dir), dtype="float32", device="cpu", kv_cache_memory_gb=3 * 16 * 1024 / 2**30)
    off, on, _ = both(small, lambda: outputs(small.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24,
                                                                                      ignore_eos=True))))
    assert on == off
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.blocks.num_free == small.engine.blocks.num_blocks


def test_length_limit(glm_dir):
    short = LLM(str(glm_dir), dtype="float32", device="cpu", max_model_len=40)
    off, on, _ = both(short, lambda: outputs(short.generate(PROMPTS, SamplingParams(temperature=0, ignore_eos=True))))
    assert on == off
    assert [len(PROMPTS[i]) + len(off[i][0]) for i in range(3)] == [40, 40, 40]


def test_rows_that_need_the_per_row_sampler_never_run_ahead(llm):
    seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    off, on, forwards = both(llm, lambda: outputs(llm.generate(PROMPTS[:2], seeded)))
    assert on == off
    assert forwards == [2] * 8  # one forward per token: nothing was launched ahead


def test_random_sampling_runs_ahead(llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=15, ignore_eos=True)
    _, on, forwards = both(llm, lambda: outputs(llm.generate(PROMPTS, params)))
    assert [len(ids) for ids, _, _ in on] == [15, 15, 15] and forwards == [3]


def test_seeded_request_arriving_beside_steps_launched_ahead(llm):
    """The running decodes come from the step launched ahead while the newcomer (sampled row by row, being seeded)
    gets its own forward; afterwards nothing runs ahead while it is in the batch."""
    def run():
        engine = llm.engine
        engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), "greedy")
        seeded = SamplingParams(temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)
        return drive(engine, {4: lambda: engine.add_request(PROMPTS[1], seeded, "seeded")})

    off, on, forwards = both(llm, run)
    assert on == off and len(on["greedy"]) == 16 and len(on["seeded"]) == 6
    assert forwards[:2] == [1, 1]  # the greedy prompt; the seeded prompt alone, beside the greedy step ahead
