"""The runner's contract: the engine hands it a Step of plain values, which survives pickling (a runner in another
process gets the same outputs), and the prefix cache never shares blocks across adapters."""

import pickle

import pytest

from glmkit import LLM, SamplingParams
from glmkit.engine.block_manager import BlockManager
from glmkit.engine.scheduler import Scheduler
from glmkit.engine.sequence import Sequence
from glmkit.engine.structured import StructuredOutput
from test_engine_basic import PROMPTS


@pytest.fixture(scope="module")
def llm(glm_dir):
    return LLM(str(glm_dir), dtype="float32", device="cpu")


class PicklingRunner:
    """Stands in for a runner in another process: every step is pickled and unpickled before it runs."""

    def __init__(self, runner):
        self.runner, self.sizes = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def run(self, step):
        data = pickle.dumps(step)
        assert b"Sequence" not in data and b"BlockManager" not in data and b"Tokenizer" not in data
        self.sizes.append(len(data) / max(len(step.rows), 1))
        return self.runner.run(pickle.loads(data))


@pytest.mark.parametrize("lookahead", [False, True])
def test_a_pickled_step_gives_the_same_outputs(llm, lookahead, monkeypatch):
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=20, seed=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, min_tokens=5),
              # constrained: the row carries its allowed-token bitmask (vocab / 8 bytes)
              SamplingParams(temperature=0, max_tokens=20, structured=StructuredOutput.regex("[a-z]{3,8}"))]
    monkeypatch.setattr(llm.engine.runner, "lookahead", lookahead)
    prompts = PROMPTS + PROMPTS[:1]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    wrapper = PicklingRunner(llm.engine.runner)
    monkeypatch.setattr(llm.engine, "runner", wrapper)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    # a decode row is a few ids and the params; only rows with penalties carry their earlier tokens
    assert wrapper.sizes and max(wrapper.sizes) < 2000
    assert llm.engine.blocks.num_used == 0


def test_runner_forgets_the_seeded_generators_of_finished_sequences(llm):
    p = SamplingParams(temperature=1.0, max_tokens=4, seed=9, ignore_eos=True)
    llm.generate(PROMPTS, p)
    llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=2))  # the next step carries the release
    assert llm.engine.runner.sampler.generators == {}


def test_prefix_cache_is_keyed_by_adapter():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, 4, 64)
    prompt = list(range(1, 14))
    first = Sequence("a", prompt, SamplingParams(max_tokens=1))
    sched.add(first)
    sched.schedule()
    first.num_cached, first.num_scheduled = len(prompt), 0
    bm.register_full_blocks(first)
    for adapter_id, hits in ((7, 0), (None, 3)):
        seq = Sequence("b", prompt, SamplingParams(max_tokens=1), adapter_id=adapter_id)
        before = bm.num_hit_blocks
        bm.allocate_cached_prefix(seq)
        assert bm.num_hit_blocks - before == hits
        bm.free(seq)
