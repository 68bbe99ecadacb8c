"""Sampler: logits [N, vocab] + per-row SamplingParams -> next token ids [N].

Penalties, temperature, top-k, top-p and min-p per row; a seeded request draws from its own generator, so
the same seed gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import Sequence


@dataclass
class Sample:
    token_id: int
    logprob: float | None = None                     # of the chosen token, under the model's raw logits
    top_logprobs: list[tuple[int, float]] | None = None  # the k most likely alternatives


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.all_ids)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:
        counts = torch.bincount(torch.tensor(seq.output_ids, device=logits.device), minlength=logits.shape[-1])
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


class Sampler:
    def __init__(self, invalid_score_token: int | None = None):
        # ChatGLM's InvalidScoreLogitsProcessor: non-finite logits force this token instead of crashing.
        self.invalid_score_token = invalid_score_token
        self.generators: dict[int, torch.Generator] = {}

    def generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        gen = self.generators.get(id(seq))
        if gen is None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seq.params.seed)
            self.generators[id(seq)] = gen
        return gen

    def forget(self, seq: Sequence) -> None:
        self.generators.pop(id(seq), None)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[Sample]:
        out = []
        for row, seq in zip(logits, seqs):
            if not torch.isfinite(row).all():
                if self.invalid_score_token is not None:
                    row = torch.zeros_like(row)
                    row[self.invalid_score_token] = 5e4
                else:
                    row = torch.nan_to_num(row, nan=-1e9, posinf=1e9, neginf=-1e9)
            raw, p = row, seq.params
            row = apply_penalties(row.clone(), seq)
            if len(seq.output_ids) < p.min_tokens and seq.stop_ids:
                row[list(seq.stop_ids)] = float("-inf")
            row = torch.nan_to_num(row, nan=float("-inf"))  # extreme penalties can overflow
            token = int(row.argmax())
            # A temperature this small is greedy in effect (and would overflow the division below).
            if not p.greedy and p.temperature >= MIN_TEMPERATURE:
                probs = filter_probs(torch.softmax(row / p.temperature, dim=-1), p.top_k, p.top_p, p.min_p)
                if torch.isfinite(probs).all() and probs.sum() > 0:
                    token = int(torch.multinomial(probs.cpu(), 1, generator=self.generator(seq)))
            out.append(self._with_logprobs(token, raw, p.logprobs))
        return out

    @staticmethod
    def _with_logprobs(token: int, raw: torch.Tensor, k: int | None) -> Sample:
        if k is None:
            return Sample(token)
        logprobs = torch.log_softmax(raw.float(), dim=-1)
        top = torch.topk(logprobs, k) if k else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if k else []
        return Sample(token, float(logprobs[token]), alternatives)
