"""BlockManager: hands out fixed-size KV-cache blocks to sequences and takes them back. Plain Python.

A sequence of L tokens holds ceil(L / block_size) blocks; token t of a sequence lives in slot
block_table[t // block_size] * block_size + t % block_size. Knows nothing of tensors or scheduling policy.
"""

from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can grow to `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        assert extra <= self.num_free, "allocate() called without can_allocate()"
        for _ in range(max(extra, 0)):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached = 0

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of tokens start..end-1 of `seq`."""
        bs, table = self.block_size, seq.block_table
        return [table[t // bs] * bs + t % bs for t in range(start, end)]
