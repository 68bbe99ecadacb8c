"""Property tests of the scheduler and block manager (plain Python, no model): budgets, completion,
reference counts, prefix-cache content, and every block back when idle, under random arrivals and aborts."""

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit.engine.block_manager import BlockManager
from glmkit.engine.sampling_params import SamplingParams
from glmkit.engine.scheduler import Scheduler
from glmkit.engine.sequence import Sequence, Status

SHARED_PREFIX = list(range(100, 140))  # a "system prompt" many requests start with


def fake_token(ids: list[int]) -> int:
    """A deterministic stand-in for a model: the next token depends on the whole sequence."""
    return int(hashlib.blake2b(str(ids).encode(), digest_size=2).hexdigest(), 16) % 50


def check_invariants(sched: Scheduler, bm: BlockManager, batch: list[Sequence]) -> None:
    assert sum(s.num_scheduled for s in batch) <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    assert all(s.num_scheduled >= 1 for s in batch)
    held: dict[int, int] = {}
    for seq in list(sched.running) + list(sched.waiting):
        for block_id in seq.block_table:
            held[block_id] = held.get(block_id, 0) + 1
    for block in bm.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == held.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in bm.free_ids)
    for h, block_id in bm.cached.items():
        assert bm.blocks[block_id].hash == h
    for seq in sched.running:
        assert len(seq.block_table) * bm.block_size >= seq.num_cached + seq.num_scheduled
        ids = seq.all_ids
        for i in range(seq.num_hashed):  # shared blocks hold exactly this sequence's tokens
            block = bm.blocks[seq.block_table[i]]
            assert bm.token_ids(block.block_id) == tuple(ids[i * bm.block_size:(i + 1) * bm.block_size])


def run_to_completion(sched: Scheduler, bm: BlockManager, arrivals: dict, aborts: dict, max_steps: int = 20000):
    """Step until every request has finished or been aborted; returns the finished sequences."""
    all_seqs, step = [], 0
    pending = sorted(arrivals)
    while pending or sched.has_work():
        assert step < max_steps, "requests did not finish"
        while pending and pending[0] <= step:
            for seq in arrivals.pop(pending.pop(0)):
                sched.add(seq)
                all_seqs.append(seq)
        for request_id in aborts.pop(step, []):
            sched.abort(request_id)
        batch = sched.schedule()
        check_invariants(sched, bm, batch)
        for seq in batch:
            seq.num_cached += seq.num_scheduled
            seq.num_scheduled = 0
            bm.register_full_blocks(seq)
            if seq.num_cached == len(seq):
                seq.output_ids.append(fake_token(seq.all_ids))
                if len(seq.output_ids) >= seq.params.max_tokens:
                    sched.finish(seq, "length")
        step += 1
    return all_seqs


requests = st.lists(st.tuples(
    st.booleans(),                                     # starts with the shared prefix
    st.lists(st.integers(0, 49), min_size=1, max_size=40),
    st.integers(1, 12),                                # max_tokens
    st.integers(0, 30),                                # arrival step
    st.one_of(st.none(), st.integers(0, 60)),          # abort step
), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(requests=requests, block_size=st.sampled_from([2, 4, 8, 16]), num_blocks=st.integers(12, 80),
       budget=st.integers(1, 96), max_num_seqs=st.integers(1, 8), prefix_caching=st.booleans())
def test_scheduler_and_block_manager(requests, block_size, num_blocks, budget, max_num_seqs, prefix_caching):
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    sched = Scheduler(bm, max_num_seqs, budget)
    arrivals, aborts = {}, {}
    for i, (shared, tail, max_tokens, arrive, abort_at) in enumerate(requests):
        prompt = (SHARED_PREFIX if shared else []) + tail
        if len(prompt) + max_tokens > num_blocks * block_size:
            continue  # would not fit the cache alone; the engine rejects such prompts up front
        seq = Sequence(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens))
        arrivals.setdefault(arrive, []).append(seq)
        if abort_at is not None:
            aborts.setdefault(abort_at, []).append(f"r{i}")
    seqs = run_to_completion(sched, bm, arrivals, aborts)
    assert all(s.status is Status.FINISHED for s in seqs)
    assert all(s.finish_reason in ("length", "abort") for s in seqs)
    for s in seqs:
        if s.finish_reason == "length":  # preemption, chunking and prefix hits never change what is generated
            expected = list(s.prompt_ids)
            for _ in range(s.params.max_tokens):
                expected.append(fake_token(expected))
            assert s.all_ids == expected
    assert bm.num_free == bm.num_blocks and not sched.running and not sched.waiting


def test_prefix_cache_hits_share_blocks():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, 4, 64)
    first = Sequence("a", SHARED_PREFIX[:13], SamplingParams(max_tokens=1))
    run_to_completion(sched, bm, {0: [first]}, {})
    second = Sequence("b", SHARED_PREFIX[:13] + [7, 8], SamplingParams(max_tokens=1))
    sched.add(second)
    batch = sched.schedule()
    assert batch == [second] and second.num_cached == 12 and second.num_scheduled == 3
    assert bm.num_hit_blocks == 3
    assert [bm.token_ids(b) for b in second.block_table[:3]] == [tuple(SHARED_PREFIX[i:i + 4]) for i in (0, 4, 8)]


def test_whole_prompt_cached_still_computes_its_last_token():
    bm = BlockManager(32, 4)
    sched = Scheduler(bm, 4, 64)
    run_to_completion(sched, bm, {0: [Sequence("a", SHARED_PREFIX[:8], SamplingParams(max_tokens=1))]}, {})
    again = Sequence("b", SHARED_PREFIX[:8], SamplingParams(max_tokens=1))
    sched.add(again)
    sched.schedule()
    assert again.num_cached == 4 and again.num_scheduled == 4  # the block holding the last token is recomputed


def test_long_prompt_is_chunked_and_decodes_keep_running():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 4, 8)
    short = Sequence("short", [1, 2, 3], SamplingParams(max_tokens=50))
    sched.add(short)
    sched.schedule()
    short.num_cached, short.num_scheduled = 3, 0
    short.output_ids.append(5)
    sched.add(Sequence("long", list(range(40)), SamplingParams(max_tokens=1)))
    for _ in range(5):
        batch = sched.schedule()
        assert short in batch and short.num_scheduled == 1  # the running stream gets its token every step
        assert sum(s.num_scheduled for s in batch) <= 8
        for seq in batch:
            seq.num_cached += seq.num_scheduled
        short.output_ids.append(5)
