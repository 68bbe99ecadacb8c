"""Sampler's batched path (rows with no penalty, seed, logprobs or active min_tokens): the same tokens or the same
distribution as the per-row path, and the ids read back from the device once a step."""

import warnings

import pytest
import torch

from glmkit import SamplingParams
from glmkit.engine.sampler import Sampler, apply_penalties, filter_probs
from glmkit.engine.step import StepRow

VOCAB = 64


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)


_next_id = iter(range(10**9))


def seq(output_ids=(), stop_ids=(), **params):
    """The row the engine would hand the sampler for a sequence with prompt [1, 2, 3, 2] and this output."""
    return StepRow(next(_next_id), [], 0, [], True, SamplingParams(**params), num_output=len(output_ids),
                   stop_ids=frozenset(stop_ids), prompt_ids=[1, 2, 3, 2], output_ids=list(output_ids))


def ids(samples):
    return [s.token_id for s in samples]


def test_routing():
    assert Sampler._is_fast(seq(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1))
    assert Sampler._is_fast(seq(min_tokens=2, stop_ids=[3], output_ids=[7, 8]))  # min_tokens reached
    assert Sampler._is_fast(seq(min_tokens=2))  # nothing to mask
    for slow in (seq(seed=1), seq(logprobs=0), seq(repetition_penalty=1.1), seq(presence_penalty=0.5),
                 seq(frequency_penalty=-0.5), seq(min_tokens=2, stop_ids=[3], output_ids=[7])):
        assert not Sampler._is_fast(slow)


def test_greedy_rows_of_a_mixed_batch_are_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(9, VOCAB)
    seqs = [seq(temperature=0), seq(temperature=1.0), seq(temperature=0, top_k=3), seq(temperature=0.8, seed=5),
            seq(temperature=1e-6), seq(temperature=0, repetition_penalty=1.5), seq(temperature=0.5, top_p=0.5),
            seq(temperature=0, logprobs=2), seq(temperature=0)]
    for _ in range(5):
        out = Sampler()(logits.clone(), seqs)
        for i in (0, 2, 4, 7, 8):
            assert out[i].token_id == int(logits[i].argmax())
        assert out[5].token_id == int(apply_penalties(logits[5].clone(), seqs[5]).argmax())
        assert out[7].logprob == pytest.approx(float(torch.log_softmax(logits[7], -1).max()))
        # a seeded row draws what it draws alone, whatever else is in the batch
        assert out[3].token_id == Sampler()(logits[3:4].clone(), [seqs[3]])[0].token_id
        assert all(0 <= t < VOCAB for t in ids(out))


def test_top_k_one_and_tiny_top_p_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(200, VOCAB) * 3
    seqs = [seq(temperature=1.5, top_k=1) if i % 2 else seq(temperature=1.5, top_p=1e-6) for i in range(200)]
    assert ids(Sampler()(logits, seqs)) == logits.argmax(-1).tolist()


def test_top_k_keeps_the_k_best():
    torch.manual_seed(2)
    row = torch.randn(VOCAB)
    best = set(torch.topk(row, 3).indices.tolist())
    # rows with other cuts in the same batch must not change this row's cut
    seqs = [seq(temperature=2.0, top_k=3), seq(temperature=2.0, top_k=20), seq(temperature=2.0)] * 1000
    out = ids(Sampler()(row.repeat(len(seqs), 1), seqs))
    assert set(out[0::3]) == best
    assert len(set(out[1::3])) > 3 and len(set(out[2::3])) > 3


CUTS = [dict(top_p=0.75), dict(min_p=0.35), dict(top_p=0.8, min_p=0.2), dict(top_p=0.9, min_p=0.05, top_k=3),
        dict(top_p=0.96), dict(top_k=2, top_p=0.6)]


def test_cuts_keep_what_filter_probs_keeps():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * 4)
    seqs = [seq(**cut) for cut in CUTS] * 500
    out = ids(Sampler()(probs.log().repeat(len(seqs), 1), seqs))
    for i, cut in enumerate(CUTS):
        kept = filter_probs(probs, cut.get("top_k", 0), cut.get("top_p", 1.0), cut.get("min_p", 0.0))
        assert set(out[i::len(CUTS)]) == set(kept.nonzero()[:, 0].tolist()), cut
    assert set(out[0::len(CUTS)]) == {0, 1}  # 0.5 < 0.75 <= 0.8


def test_frequencies_follow_the_distribution():
    torch.manual_seed(3)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 4000
    out = torch.tensor(ids(Sampler()(probs.log().repeat(n, 1), [seq(temperature=1.0, top_p=1.0)] * n)))
    freq = torch.bincount(out, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.03), freq
    # temperature 0.5 squares the probabilities
    out = torch.tensor(ids(Sampler()(probs.log().repeat(n, 1), [seq(temperature=0.5)] * n)))
    sharp = probs**2 / (probs**2).sum()
    assert torch.allclose(torch.bincount(out, minlength=4).float() / n, sharp, atol=0.03)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_rows(temperature):
    logits = torch.randn(4, VOCAB)
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    logits[3, :] = float("-inf")
    seqs = [seq(temperature=temperature, top_k=4)] * 4
    forced = ids(Sampler(invalid_score_token=5)(logits.clone(), seqs))
    assert forced[1:] == [5, 5, 5] and forced[0] in torch.topk(logits[0], 4).indices.tolist()
    cleaned = ids(Sampler()(logits.clone(), seqs))
    assert cleaned[2] == 9  # +inf -> 1e9 dominates
    assert 0 <= cleaned[1] < VOCAB and cleaned[1] != 7 and 0 <= cleaned[3] < VOCAB
    if temperature == 0.0:  # the per-row path (a logprobs request) agrees
        slow = [seq(temperature=0.0, logprobs=0)] * 4
        assert ids(Sampler(invalid_score_token=5)(logits.clone(), slow)) == forced
        assert ids(Sampler()(logits.clone(), slow)) == cleaned


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(2, VOCAB)
    logits[:, 3] = 50.0  # the stop id, by far the most likely
    sampler = Sampler()
    for _ in range(50):
        early = [seq(temperature=1.0, min_tokens=3, stop_ids=[3], output_ids=[8] * n) for n in (0, 2)]
        assert 3 not in ids(sampler(logits.clone(), early))
    done = [seq(temperature=1.0, min_tokens=3, stop_ids=[3], output_ids=[8] * 3), seq(temperature=0, min_tokens=3)]
    assert ids(sampler(logits.clone(), done)) == [3, 3]


def test_batched_path_reads_the_device_once(monkeypatch):
    """Every host read (tolist, item, int(), bool(), .cpu(), ...) is counted: the batched path makes one."""
    reads = []
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    logits = torch.randn(6, VOCAB)
    logits[4, 0] = float("nan")
    seqs = [seq(temperature=0), seq(temperature=0.7, top_k=5), seq(top_p=0.9), seq(min_p=0.1),
            seq(temperature=1.2, top_k=10, top_p=0.8, min_p=0.05), seq(temperature=1e-7)]
    Sampler(invalid_score_token=5)(logits, seqs)
    assert reads == ["tolist"]
    reads.clear()
    Sampler()(logits, seqs[:1] + [seq(temperature=0, logprobs=0)])  # a per-row row reads as before
    assert reads.count("tolist") >= 1 and len(reads) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("invalid_score_token", [5, None])
def test_batched_path_synchronises_once_on_cuda(invalid_score_token):
    logits = torch.randn(256, 32000, device="cuda")
    logits[4, 9] = float("nan")
    params = [dict(temperature=0), dict(temperature=0.7, top_k=50), dict(top_p=0.9), dict(min_p=0.05, top_k=20)]
    seqs = [seq(**params[i % 4]) for i in range(256)]
    sampler = Sampler(invalid_score_token=invalid_score_token)
    sampler(logits, seqs)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sampler(logits, seqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    greedy = torch.nan_to_num(logits[0::4], nan=-1e9).argmax(-1).tolist()
    if invalid_score_token is not None:
        greedy[1] = invalid_score_token
    assert [s.token_id for s in out[0::4]] == greedy
