"""LLMEngine: add_request / step / abort over a model runner, a scheduler and per-sequence detokenizers.

`step()` schedules a batch, runs it, updates the sequences and returns their deltas. Knows token ids,
sampling and stop conditions; knows nothing of chat formats, tools or HTTP.
"""

from __future__ import annotations

import logging
import time

from ..errors import ContextLengthError, InvalidParameterError
from ..tokenizers.base import Tokenizer
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .outputs import Delta
from .runner import ModelRunner
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger("glmkit")


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int = 64, max_num_batched_tokens: int = 4096,
                 eos_token_ids: list[int] | None = None):
        self.runner, self.tokenizer = runner, tokenizer
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids or [])
        self.seqs: dict[str, list[Sequence]] = {}
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> None:
        if request_id in self.seqs:
            raise InvalidParameterError("request_id", request_id, "is already in use by a running request")
        if not prompt_ids:
            raise InvalidParameterError("prompt", prompt_ids, "is empty; give at least one token")
        bad = [i for i in prompt_ids if not 0 <= i < self.runner.model.config.vocab_size]
        if bad:
            raise InvalidParameterError("prompt", bad[:5], f"token ids must be in [0, {self.runner.model.config.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthError(len(prompt_ids), self.max_model_len)
        seqs = []
        for index in range(params.n):
            p = params if params.n == 1 or params.seed is None else _with_seed(params, params.seed + index)
            seq = Sequence(request_id, prompt_ids, p)
            seq.index = index
            seq.stop_ids = set(p.stop_token_ids) | set(p.extra_stop_token_ids)
            if not p.ignore_eos:
                seq.stop_ids |= self.eos_token_ids
            seq.detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens)
            seq.text, seq.num_sent = "", 0  # detokenized output; how much of it was handed out
            seqs.append(seq)
            self.scheduler.add(seq)
        self.seqs[request_id] = seqs

    def abort(self, request_id: str) -> None:
        for seq in self.scheduler.abort(request_id):
            self.runner.sampler.forget(seq)
        self.seqs.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Delta]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        if is_prefill:
            self.num_prompt_tokens += sum(len(s) - s.num_cached for s in seqs)
        next_ids = self.runner.run(seqs, self.blocks)
        now = time.monotonic()
        deltas = []
        for seq, token_id in zip(seqs, next_ids):
            seq.output_ids.append(token_id)
            seq.first_token_time = seq.first_token_time or now
            self.num_generated_tokens += 1
            deltas.append(self._update(seq, token_id))
        return deltas

    def _update(self, seq: Sequence, token_id: int) -> Delta:
        p = seq.params
        num_out = len(seq.output_ids)
        new_ids, reason, stop_reason = [token_id], None, None
        if token_id in seq.stop_ids and num_out > p.min_tokens:
            new_ids, reason, stop_reason = [], "stop", token_id
            num_out -= 1
        elif (p.max_tokens is not None and num_out >= p.max_tokens) or len(seq) >= self.max_model_len:
            reason = "length"
        before = len(seq.text)
        seq.text += seq.detok.add(new_ids, final=reason is not None)
        end = len(seq.text)
        if p.stop:
            longest = max(len(s) for s in p.stop)
            hit = _find_stop(seq.text, p.stop, max(0, before - longest + 1))
            if hit is not None:
                end, stop_reason, reason = hit[0], hit[1], "stop"
                seq.text = seq.text[:end]
            elif reason is None:
                end = max(seq.num_sent, end - longest + 1)  # hold back a possible stop-string start
        text, seq.num_sent = seq.text[seq.num_sent:end], end
        if reason is not None:
            seq.stop_reason = stop_reason
            self.scheduler.finish(seq, reason)
            self.runner.sampler.forget(seq)
            self._drop_if_done(seq.request_id)
        return Delta(seq.request_id, seq.index, text, new_ids, reason, stop_reason,
                     num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=num_out)

    def _drop_if_done(self, request_id: str) -> None:
        if all(s.finished for s in self.seqs.get(request_id, [])):
            self.seqs.pop(request_id, None)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in text[start:], as (position, stop string)."""
    hits = [(text.find(s, start), s) for s in stops]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits) if hits else None
