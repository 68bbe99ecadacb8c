"""Sequence: one prompt being generated (token ids, block table, status). Plain Python; no torch."""

from __future__ import annotations

import enum
import itertools
import time

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, index: int = 0,
                 stop_ids: set[int] | frozenset[int] = frozenset(), detokenizer=None, adapter_id: int | None = None):
        self.seq_id = next(_seq_ids)  # unique in the process: what the runner knows the sequence by
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_cached = 0           # tokens whose K/V is in the cache
        self.num_hashed = 0           # leading full blocks registered for prefix sharing
        self.num_scheduled = 0        # tokens to compute in the current step
        self.num_resets = 0           # times its blocks were taken back (preemption, finishing)
        self.num_prefix_hit_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.index = index            # choice index among the request's n sequences
        self.stop_ids = frozenset(stop_ids)
        self.detok = detokenizer      # IncrementalDetokenizer (None: no text, ids only)
        self.adapter_id = adapter_id  # None: the base model; salts the prefix-cache hashes of its blocks
        self.text = ""                # detokenized output so far
        self.num_sent = 0             # how much of `text` was handed out (the rest may start a stop string)
        self.matcher = None           # constrained decoding: the grammar state (engine/structured.py)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 without building all_ids (the engine asks for a few new ones every step)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:end] + (self.output_ids[:end - n] if end > n else [])

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
