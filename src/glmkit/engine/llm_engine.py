"""LLMEngine: add_request / step / abort over a model runner, a scheduler and per-sequence detokenizers.

`step()` schedules a batch, describes it to the runner in plain values (a Step), runs it, updates the
sequences and returns their deltas. The engine owns all cache bookkeeping (the scheduler and block manager):
the runner only computes. Knows token ids, sampling and stop conditions; knows nothing of chat formats, tools
or HTTP. Not thread-safe: one loop owns it (see async_engine.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

from ..errors import ContextLengthError, InvalidParameterError, ModelLoadError
from ..models.ptuning import PrefixAdapter
from ..tokenizers.base import Tokenizer
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .metrics import EngineSnapshot, EngineStats
from .outputs import Delta
from .runner import ModelRunner
from .sampler import Sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .step import Step, StepRow
from .structured import Grammars

class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int = 64, max_num_batched_tokens: int = 4096,
                 eos_token_ids: list[int] | None = None, enable_prefix_caching: bool = True,
                 grammars: Grammars | None = None):
        self.runner, self.tokenizer = runner, tokenizer
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.max_model_len = max_model_len
        self.vocab_size = runner.vocab_size
        self.eos_token_ids = set(eos_token_ids or [])
        self.grammars = grammars or Grammars(tokenizer, self.vocab_size)
        self.seqs: dict[str, list[Sequence]] = {}
        self.stats = EngineStats()
        self._released: list[int] = []  # seq_ids finished since the last step, for the runner to forget
        self.adapter_ids: set[int] = set()         # the adapters requests may name (params.adapter_id)
        self.prefixes: dict[int, list[int]] = {}  # a P-Tuning adapter's pinned prefix blocks
        self.after_prefix: set[int] = set()       # prefixes whose real tokens take positions after them (peft)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise the error a request would get, without touching engine state (safe from any thread)."""
        if not prompt_ids:
            raise InvalidParameterError("prompt", prompt_ids, "is empty; give at least one token")
        bad = [i for i in prompt_ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise InvalidParameterError("prompt", bad[:5], f"token ids must be integers in [0, {self.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthError(len(prompt_ids), self.max_model_len)
        if not isinstance(params, SamplingParams):
            raise InvalidParameterError("params", type(params).__name__, "must be a SamplingParams")
        if params.structured is not None:
            self.grammars.check(params.structured)  # compiled once; a bad grammar is the request's error
        if params.adapter_id is not None and params.adapter_id not in self.adapter_ids:
            raise InvalidParameterError("model", params.adapter_id, "names an adapter that is not loaded (any more)")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> None:
        if request_id in self.seqs:
            raise InvalidParameterError("request_id", request_id, "is already in use by a running request")
        self.validate(prompt_ids, params)
        seqs = []
        for index in range(params.n):
            p = params if params.n == 1 or params.seed is None else replace(params, seed=params.seed + index)
            stop_ids = set(p.stop_token_ids) | set(p.extra_stop_token_ids)
            if not p.ignore_eos:
                stop_ids |= self.eos_token_ids
            seq = Sequence(request_id, prompt_ids, p, index, stop_ids,
                           IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens), p.adapter_id)
            if p.structured is not None:
                seq.matcher = self.grammars.matcher(p.structured)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.seqs[request_id] = seqs

    # -- adapters (on the engine's thread, between steps) ------------------------------------------------
    def add_adapter(self, adapter_id: int, adapter) -> None:
        """Serve an adapter under `adapter_id`, an id never used before, so no cached block (their hashes are
        salted with the id) is shared with another adapter's requests. A LoRA (lora.Adapter) goes to the runner's
        linears; a P-Tuning prefix (ptuning.PrefixAdapter) is written once into blocks pinned for it, which every
        request of the adapter attends to before its own."""
        if isinstance(adapter, PrefixAdapter):
            bs = self.blocks.block_size
            if adapter.pre_seq_len % bs:
                fits = [b for b in (8, 16, 32, 64, 128, 256) if b < bs and adapter.pre_seq_len % b == 0]
                fix = f"start with --block-size {fits[-1]}" if fits else "no block size (8 at least) divides it"
                raise ModelLoadError(f"{adapter.path}: pre_seq_len={adapter.pre_seq_len} is not a multiple of the KV "
                                     f"cache's block size ({bs}), which its pinned prefix needs; {fix}")
            try:
                blocks = self.blocks.pin(adapter.pre_seq_len // bs)
            except ValueError as e:
                raise ModelLoadError(f"{adapter.path}: no room for its {adapter.pre_seq_len}-token prefix ({e}); "
                                     "retry when fewer requests run, or raise --kv-cache-memory") from None
            self.runner.write_prefix(blocks, adapter.kv)
            self.prefixes[adapter_id] = blocks
            if adapter.after_prefix:
                self.after_prefix.add(adapter_id)
        else:
            self.runner.adapters.add(adapter_id, adapter)
        self.adapter_ids.add(adapter_id)

    def remove_adapter(self, adapter_id: int) -> int:
        """Stop serving an adapter unless requests of it are queued or running: returns how many (0: removed)."""
        running = self.adapter_requests(adapter_id)
        if running:
            return running
        self.adapter_ids.discard(adapter_id)
        if adapter_id in self.prefixes:
            self.blocks.unpin(self.prefixes.pop(adapter_id))
            self.after_prefix.discard(adapter_id)
        else:
            self.runner.adapters.remove(adapter_id)
        return 0

    def adapter_requests(self, adapter_id: int) -> int:
        """Sequences of this adapter that are queued or running."""
        return sum(seq.adapter_id == adapter_id and not seq.finished for seqs in self.seqs.values() for seq in seqs)

    def abort(self, request_id: str) -> None:
        removed = self.scheduler.abort(request_id)
        self._released += [seq.seq_id for seq in removed]
        if removed:
            self.stats.num_requests_aborted += 1
        self.seqs.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Delta]:
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        self.stats.num_prompt_tokens += sum(min(s.num_scheduled, max(len(s.prompt_ids) - s.num_cached, 0))
                                            for s in seqs)
        sampling = [s for s in seqs if s.num_cached + s.num_scheduled == len(s)]
        run_ahead = self._reserve_next(sampling)  # before the rows: their block tables then include it
        rows = [self._row(s) for s in seqs]
        self._constrain(seqs, rows)
        step = Step(rows, run_ahead, self._released)
        self._released = []
        samples = self.runner.run(step)
        for seq in seqs:
            seq.num_cached += seq.num_scheduled
            seq.num_scheduled = 0
            self.blocks.register_full_blocks(seq)
        now = time.monotonic()
        deltas = []
        for seq, sample in zip(sampling, samples):
            if seq.matcher is not None and sample.token_id not in seq.stop_ids:
                seq.matcher.consume_token(sample.token_id)
            seq.output_ids.append(sample.token_id)
            if seq.first_token_time is None:
                seq.first_token_time = now
                self.stats.time_to_first_token.observe(now - seq.arrival_time)
            self.stats.num_generated_tokens += 1
            deltas.append(self._update(seq, sample))
        self.stats.num_preemptions = self.scheduler.num_preemptions
        return deltas

    def _row(self, seq: Sequence) -> StepRow:
        p, start, end = seq.params, seq.num_cached, seq.num_cached + seq.num_scheduled
        penalties = p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
        return StepRow(seq.seq_id, seq.token_ids(start, end), start, seq.block_table, end == len(seq), p,
                       len(seq.output_ids), seq.stop_ids, seq.prompt_ids if penalties else None,
                       seq.output_ids if penalties else None, seq.num_resets, seq.adapter_id,
                       self.prefixes.get(seq.adapter_id, []), seq.adapter_id in self.after_prefix)

    def _constrain(self, seqs: list[Sequence], rows: list[StepRow]) -> None:
        """Give each sampling row of a constrained sequence the bitmask of the tokens its grammar allows next
        (filled for all of them together, before the step)."""
        picked = [(seq, row) for seq, row in zip(seqs, rows) if row.sample and seq.matcher is not None]
        if not picked:
            return
        masks = self.grammars.fill([seq.matcher for seq, _ in picked], [seq.stop_ids for seq, _ in picked])
        for (_, row), mask in zip(picked, masks):
            row.allowed = mask

    def _reserve_next(self, sampling: list[Sequence]) -> bool:
        """For a runner that launches the next decode step ahead: give each sampling sequence the block of the
        position its sampled token will take. The next step needs that block anyway; False if it cannot be had,
        or if every one of them stops at the token being sampled (nothing to run ahead)."""
        if not (self.runner.lookahead and sampling):
            return False
        if all(len(s) + 1 >= self.max_model_len
               or (s.params.max_tokens is not None and len(s.output_ids) + 1 >= s.params.max_tokens)
               for s in sampling):
            return False
        positions = [len(s) for s in sampling]
        new_blocks = sum(max(self.blocks.blocks_needed(p + 1) - len(s.block_table), 0)
                         for s, p in zip(sampling, positions))
        if new_blocks > self.blocks.num_free or max(positions) >= self.max_model_len:
            return False
        for seq, p in zip(sampling, positions):
            self.blocks.allocate(seq, p + 1)
        return True

    def _update(self, seq: Sequence, sample: Sample) -> Delta:
        p, token_id = seq.params, sample.token_id
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
            self._finish(seq, reason, stop_reason)
        logprobs = [(token_id, sample.logprob, sample.top_logprobs)] if sample.logprob is not None and new_ids else None
        return Delta(seq.request_id, seq.index, text, new_ids, reason, stop_reason,
                     num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=num_out, logprobs=logprobs,
                     num_cached_tokens=seq.num_prefix_hit_tokens)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.stop_reason = stop_reason
        seq.matcher = None
        self.scheduler.finish(seq, reason)
        self._released.append(seq.seq_id)
        self.stats.num_requests_finished += 1
        if len(seq.output_ids) > 1 and seq.first_token_time is not None:
            per_token = (time.monotonic() - seq.first_token_time) / (len(seq.output_ids) - 1)
            self.stats.time_per_output_token.observe(per_token)
        if all(s.finished for s in self.seqs.get(seq.request_id, [])):
            self.seqs.pop(seq.request_id, None)

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(self.counters(), copy.deepcopy(self.stats))

    def counters(self) -> dict[str, float]:
        """Point-in-time gauges for monitoring."""
        b = self.blocks
        return {
            "requests_running": len(self.scheduler.running), "requests_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": b.num_used, "kv_blocks_free": b.num_free, "kv_blocks_total": b.num_blocks,
            "prefix_cache_queries": b.num_queried_blocks, "prefix_cache_hits": b.num_hit_blocks,
            "prefix_cache_hit_rate": b.num_hit_blocks / b.num_queried_blocks if b.num_queried_blocks else 0.0,
        }


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in text[start:], as (position, stop string)."""
    hits = [(text.find(s, start), s) for s in stops]
    hits = [h for h in hits if h[0] >= 0]
    return min(hits) if hits else None
