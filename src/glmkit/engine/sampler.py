"""Sampler: logits [N, vocab] + per-row SamplingParams -> next token ids [N].

Penalties, temperature, top-k, top-p and min-p per row; a seeded request draws from its own generator, so
the same seed gives the same tokens whatever else is in the batch. Rows with no penalty, seed, logprobs or active
min_tokens go through one batched pass on the logits' device that reads the ids back once; the others go row by
row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .step import StepRow
from .structured import unpack_mask


@dataclass
class Sample:
    token_id: int
    logprob: float | None = None                     # of the chosen token, under the model's raw logits
    top_logprobs: list[tuple[int, float]] | None = None  # the k most likely alternatives


def apply_penalties(logits: torch.Tensor, row: StepRow) -> torch.Tensor:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(row.output_ids, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """probs [vocab] -> renormalised probs with the cut tokens at zero."""
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        remove = (cumulative - sorted_probs) >= top_p * cumulative[-1]
        remove[0] = False  # even when top_p * mass underflows to 0
        sorted_probs[remove] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum()


MIN_TEMPERATURE = 1e-5


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on `device`. To a GPU through pinned memory, asynchronously: a plain copy from pageable
    memory would wait for the queued forward pass (a host synchronisation)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class Sampler:
    def __init__(self, invalid_score_token: int | None = None):
        # ChatGLM's InvalidScoreLogitsProcessor: non-finite logits force this token instead of crashing.
        self.invalid_score_token = invalid_score_token
        self.generators: dict[int, torch.Generator] = {}

    def generator(self, row: StepRow) -> torch.Generator | None:
        if row.params.seed is None:
            return None
        gen = self.generators.get(row.seq_id)
        if gen is None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(row.params.seed)
            self.generators[row.seq_id] = gen
        return gen

    def forget(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    @staticmethod
    def constrain(logits: torch.Tensor, rows: list[StepRow]) -> torch.Tensor:
        """Tokens outside a constrained row's allowed set get the lowest finite logit (before penalties,
        temperature and cuts; finite, so ChatGLM's non-finite-logits rule still sees only the model's own
        values). A row whose set is empty (never expected) is left as it is."""
        where = [i for i, row in enumerate(rows) if row.allowed is not None]
        if not where:
            return logits
        words = torch.stack([rows[i].allowed for i in where])
        words = words.pin_memory().to(logits.device, non_blocking=True) if logits.device.type == "cuda" else words
        allowed = unpack_mask(words, logits.shape[-1])
        allowed |= ~allowed.any(-1, keepdim=True)
        index = to_device(where, torch.long, logits.device)
        logits = logits.clone()
        logits[index] = logits[index].masked_fill(~allowed, torch.finfo(logits.dtype).min)
        return logits

    def __call__(self, logits: torch.Tensor, rows: list[StepRow]) -> list[Sample]:
        """One host synchronisation for the rows that need no per-row work (reading their ids once)."""
        logits = self.constrain(logits, rows)
        out: list[Sample | None] = [None] * len(rows)
        fast = []
        for i, row in enumerate(rows):
            if self._is_fast(row):
                fast.append(i)
            else:  # penalties, seeds, logprobs or min_tokens: the per-row path
                out[i] = self._sample_row(logits[i], row)
        if fast:
            picked = logits if len(fast) == len(rows) else logits.index_select(0, to_device(fast, torch.long,
                                                                                            logits.device))
            for i, token in zip(fast, self._draw(picked, [rows[i] for i in fast]).tolist()):
                out[i] = Sample(token)
        return out

    @staticmethod
    def _is_fast(row: StepRow, ahead: int = 0) -> bool:
        """Whether the row can go through the batched pass (`ahead` tokens from now)."""
        p = row.params
        if ahead and p.structured is not None:  # the next token's allowed set depends on this one
            return False
        return (p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and p.seed is None and p.logprobs is None
                and not (row.num_output + ahead < p.min_tokens and row.stop_ids))

    def batchable(self, rows: list[StepRow], ahead: int = 0) -> bool:
        """Whether every row can be sampled by sample_ids() (now, or `ahead` tokens from now)."""
        return all(self._is_fast(row, ahead) for row in rows)

    def sample_ids(self, logits: torch.Tensor, rows: list[StepRow]) -> torch.Tensor:
        """logits [R, vocab] of rows without penalties, seeds, logprobs or min_tokens -> R token ids, on the
        logits' device (nothing is read back: the caller decides when)."""
        return self._draw(self.constrain(logits, rows), rows)

    def _draw(self, logits: torch.Tensor, rows: list[StepRow]) -> torch.Tensor:
        dev, vocab = logits.device, logits.shape[-1]
        if self.invalid_score_token is not None:
            forced = torch.zeros(1, vocab, dtype=logits.dtype, device=dev)
            forced[:, self.invalid_score_token].fill_(5e4)  # `forced[0, t] = 5e4` would copy (and sync)
            logits = torch.where(torch.isfinite(logits).all(-1, keepdim=True), logits, forced)
        else:  # the identity on finite rows
            logits = torch.nan_to_num(logits, nan=-1e9, posinf=1e9, neginf=-1e9)
        ids = logits.argmax(-1)
        params = [row.params for row in rows]
        sampled = [not p.greedy and p.temperature >= MIN_TEMPERATURE for p in params]
        if any(sampled):
            ps = [p if s else None for p, s in zip(params, sampled)]  # greedy rows: no cut, temperature 1
            temperature = to_device([[p.temperature if p else 1.0] for p in ps], logits.dtype, dev)
            probs = torch.softmax(logits / temperature, dim=-1)
            ok = torch.isfinite(probs).all(-1)
            top_k = [p.top_k if p and 0 < p.top_k < vocab else 0 for p in ps]
            if any(top_k):
                top = torch.topk(probs, max(top_k), dim=-1).values
                kth = top.gather(-1, to_device([[max(k, 1) - 1] for k in top_k], torch.long, dev))
                kth = torch.where(to_device([[k > 0] for k in top_k], torch.bool, dev), kth, 0.0)
                probs = torch.where(probs >= kth, probs, 0.0)
            if any(p and p.min_p > 0.0 for p in ps):
                min_p = to_device([[p.min_p if p else 0.0] for p in ps], probs.dtype, dev)
                probs = torch.where(probs >= min_p * probs.amax(-1, keepdim=True), probs, 0.0)
            if any(p and p.top_p < 1.0 for p in ps):
                top_p = to_device([[p.top_p if p else 1.0] for p in ps], probs.dtype, dev)
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                cumulative = sorted_probs.cumsum(-1)
                # as filter_probs: keep the smallest prefix whose mass reaches top_p, at least the top token
                remove = ((cumulative - sorted_probs) >= top_p * cumulative[:, -1:]) & (top_p < 1.0)
                remove[:, 0] = False
                probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(remove, 0.0))
            total = probs.sum(-1, keepdim=True)
            probs = probs / total
            ok &= torch.isfinite(probs).all(-1) & (total[:, 0] > 0)
            # Exponential race: argmax p / E with E ~ Exp(1) picks token i with probability p_i, and unlike
            # torch.multinomial needs no host sync. The clamp keeps E = 0 from turning a 0 into NaN.
            noise = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
            drawn = (probs / noise).argmax(-1)
            ids = torch.where(ok & to_device(sampled, torch.bool, dev), drawn, ids)
        return ids

    def _sample_row(self, logits: torch.Tensor, row: StepRow) -> Sample:
        if not torch.isfinite(logits).all():
            if self.invalid_score_token is not None:
                logits = torch.zeros_like(logits)
                logits[self.invalid_score_token] = 5e4
            else:
                logits = torch.nan_to_num(logits, nan=-1e9, posinf=1e9, neginf=-1e9)
        raw, p = logits, row.params
        logits = apply_penalties(logits.clone(), row)
        if row.num_output < p.min_tokens and row.stop_ids:
            logits[list(row.stop_ids)] = float("-inf")
        logits = torch.nan_to_num(logits, nan=float("-inf"))  # extreme penalties can overflow
        token = int(logits.argmax())
        # A temperature this small is greedy in effect (and would overflow the division below).
        if not p.greedy and p.temperature >= MIN_TEMPERATURE:
            probs = filter_probs(torch.softmax(logits / p.temperature, dim=-1), p.top_k, p.top_p, p.min_p)
            if torch.isfinite(probs).all() and probs.sum() > 0:
                token = int(torch.multinomial(probs.cpu(), 1, generator=self.generator(row)))
        return self._with_logprobs(token, raw, p.logprobs)

    @staticmethod
    def _with_logprobs(token: int, raw: torch.Tensor, k: int | None) -> Sample:
        if k is None:
            return Sample(token)
        logprobs = torch.log_softmax(raw.float(), dim=-1)
        top = torch.topk(logprobs, k) if k else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if k else []
        return Sample(token, float(logprobs[token]), alternatives)
