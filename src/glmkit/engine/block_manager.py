"""BlockManager: hands out fixed-size KV-cache blocks to sequences, shares full blocks by content (prefix
caching) and takes them back. Plain Python; no torch.

Token t of a sequence lives in slot block_table[t // block_size] * block_size + t % block_size. A full block
is identified by the hash of its tokens and of everything before it, so two sequences that start alike (a
shared system prompt, a tool list, the earlier turns of a chat) share the same physical blocks. The first
block's hash is salted with the sequence's adapter id (None for the base model): the same tokens under another
adapter have other K/V (P-Tuning prefixes, LoRA on k/v), so they never share blocks. A freed block
keeps its content and hash until it is handed out again, so a later request can still hit it.

Free blocks are handed out least-recently-freed first, so under load every block of the pool ends up hashed:
what the index keeps per block must be small and allocated up front. The tokens of every block live in one
int32 array made at start-up (not a tuple of int objects per block, which kept ~0.6 KB per hashed block alive
and grew the server's memory until the whole pool had been used once: ~100 MB, ~50,000 requests, on a GPU pool
of 131,072 blocks); a hashed block adds only its hash and its entry in `cached`.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while the block holds a full, registered block of tokens


def block_hash(prev_hash: int | None, token_ids: tuple[int, ...], salt=None) -> int:
    """prev_hash is None for a sequence's first block, whose hash takes the salt (the adapter id) instead."""
    return hash((prev_hash, token_ids) if prev_hash is not None else (("salt", salt), token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in least-recently-freed order; a cached one is only overwritten when it reaches the front.
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # content hash -> block id
        # Every block's tokens (block b: [b * block_size, (b + 1) * block_size)), valid while its hash is set;
        # filled with zeros now, so its memory is in use from the start rather than growing with the traffic.
        self.block_tokens = array("i", bytes(4 * num_blocks * block_size))
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `seq` can hold `num_tokens` tokens."""
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free

    def token_ids(self, block_id: int) -> tuple[int, ...]:
        """The tokens a hashed block holds."""
        return tuple(self._tokens(block_id))

    def _tokens(self, block_id: int) -> array:
        bs = self.block_size
        return self.block_tokens[block_id * bs:(block_id + 1) * bs]

    def allocate_cached_prefix(self, seq: Sequence) -> None:
        """Give a sequence without blocks the cached blocks of its longest cached prefix (leaving at least one
        token to compute, so its last position yields logits); sets seq.num_cached."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return
        ids, bs, prev = seq.all_ids, self.block_size, None
        for start in range(0, len(ids) - 1 - bs + 1, bs):
            tokens = ids[start:start + bs]
            h = block_hash(prev, tuple(tokens), seq.adapter_id)
            self.num_queried_blocks += 1
            block_id = self.cached.get(h)
            if block_id is None or self._tokens(block_id) != array("i", tokens):
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            self.num_hit_blocks += 1
            prev = h
        seq.num_cached = len(seq.block_table) * bs
        seq.num_hashed = len(seq.block_table)
        seq.num_prefix_hit_tokens = max(seq.num_prefix_hit_tokens, seq.num_cached)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold num_tokens tokens."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        assert extra <= self.num_free, "allocate() called without can_allocate()"
        for _ in range(max(extra, 0)):
            seq.block_table.append(self._fresh())

    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that are now full of computed tokens so that later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        bs, table = self.block_size, seq.block_table
        prev = self.blocks[table[seq.num_hashed - 1]].hash if seq.num_hashed else None
        ids = None
        for i in range(seq.num_hashed, seq.num_cached // bs):
            block = self.blocks[table[i]]
            if block.hash is None:
                ids = ids or seq.all_ids
                tokens = ids[i * bs:(i + 1) * bs]
                start = block.block_id * bs
                self.block_tokens[start:start + bs] = array("i", tokens)
                block.hash = block_hash(prev, tuple(tokens), seq.adapter_id)
                self.cached.setdefault(block.hash, block.block_id)
            prev = block.hash
        seq.num_hashed = max(seq.num_hashed, seq.num_cached // bs)

    def pin(self, num_blocks: int) -> list[int]:
        """Take blocks out of the pool for good (an adapter's prefix); raises when the pool has too few free."""
        if num_blocks > self.num_free:
            raise ValueError(f"the KV cache has {self.num_free} free blocks and {num_blocks} are needed")
        return [self._fresh() for _ in range(num_blocks)]

    def unpin(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            self.blocks[block_id].ref_count = 0
            self.free_ids[block_id] = None

    def free(self, seq: Sequence) -> None:
        # Release the tail first so that, once freed, the earlier (more shareable) blocks are overwritten last.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0
            if block.ref_count == 0:
                self.free_ids[block_id] = None
        seq.block_table = []
        seq.num_cached = seq.num_hashed = 0
        seq.num_resets += 1

    def _fresh(self) -> int:
        """The least recently freed block, its old content forgotten, taken."""
        block_id = next(iter(self.free_ids))
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash = None
        self._take(block_id)
        return block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_ids)
