"""Scheduler: picks which sequences run in the next step (continuous batching). Plain Python; no torch.

A step is either a prefill of waiting sequences (as many as the token budget, batch size and free blocks
allow) or one decode token for every running sequence. When blocks run out during decode, the most recently
admitted sequences are preempted (their blocks freed; they are recomputed later), never failed.
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

    def schedule(self) -> tuple[list[Sequence], bool]:
        """-> (sequences to run, is_prefill)."""
        batch, num_tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq) - seq.num_cached
            # A prompt longer than the budget still runs, alone (chunked prefill splits it later).
            if batch and num_tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq, len(seq)):
                break
            self.blocks.allocate(seq, len(seq))
            self.waiting.popleft()
            seq.status = Status.RUNNING
            batch.append(seq)
            num_tokens += new_tokens
        if batch:
            self.running.extend(batch)
            return batch, True
        for seq in list(self.running):
            if seq not in self.running:  # preempted below as a victim
                continue
            while not self.blocks.can_allocate(seq, len(seq)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.allocate(seq, len(seq))
                batch.append(seq)
        return batch, False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
