"""Scheduler: picks what runs in the next step (continuous batching with chunked prefill). Plain Python.

Every step first gives each running sequence what it needs (one token for a decode, the next chunk for a
prompt still being prefilled), then admits waiting sequences into the remaining token budget, so long prompts
are prefilled in chunks and never starve running streams. A new sequence first takes the cached blocks of its
longest cached prefix. When blocks run out, the most recently admitted sequences are preempted (blocks freed,
recomputed later), never failed.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> list[Sequence]:
        """Remove every sequence of the request, freeing its blocks at once."""
        removed = [s for s in list(self.waiting) + self.running if s.request_id == request_id]
        for seq in removed:
            self.finish(seq, "abort")
        return removed

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, seq.finish_reason or reason

    def schedule(self) -> list[Sequence]:
        """The sequences to run; each has num_scheduled tokens to compute, starting at num_cached."""
        budget, batch = self.max_num_batched_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted as a victim below
                continue
            num = min(len(seq) - seq.num_cached, budget)
            if not self._make_room(seq, seq.num_cached + num):
                continue
            self.blocks.allocate(seq, seq.num_cached + num)
            seq.num_scheduled = num
            batch.append(seq)
            budget -= num
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.allocate_cached_prefix(seq)
            num = min(len(seq) - seq.num_cached, budget)
            if not self.blocks.can_allocate(seq, seq.num_cached + num):
                self.blocks.free(seq)  # do not sit on cached blocks while waiting
                break
            self.blocks.allocate(seq, seq.num_cached + num)
            self.waiting.popleft()
            seq.status, seq.num_scheduled = Status.RUNNING, num
            self.running.append(seq)
            batch.append(seq)
            budget -= num
        return batch

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the newest running sequences until seq fits; False if seq itself had to go."""
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
