"""The step description the engine hands the model runner: plain values only (ints, lists, SamplingParams, and
a constrained row's allowed-token bitmask).

No Sequence, no BlockManager and no tokenizer cross into the runner, so a step pickles cheaply and a runner can
live in another process (one per GPU for tensor parallelism). The engine owns every piece of cache bookkeeping
(what is cached, which blocks a sequence holds, the block reserved for a step launched ahead); the runner turns
a Step into tensors, runs the model and samples. Knows nothing of text, chat formats or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


@dataclass(slots=True)
class StepRow:
    """One scheduled sequence: compute `token_ids` at positions start .. start + len(token_ids) - 1."""
    seq_id: int                   # stable per sequence: keys the runner's own state (seeded generators, steps ahead)
    token_ids: list[int]
    start: int                    # tokens before `start` already have their K/V in the cache
    block_table: list[int]        # the sequence's KV blocks (read during run() only, never kept)
    sample: bool                  # the chunk reaches the sequence's end: its last position picks the next token
    params: SamplingParams
    num_output: int = 0           # tokens generated so far (min_tokens)
    stop_ids: frozenset[int] = frozenset()  # masked while min_tokens is not reached
    # Every earlier token, only when a penalty needs them (repetition: all; presence/frequency: the output).
    prompt_ids: list[int] | None = None
    output_ids: list[int] | None = None
    num_resets: int = 0           # times the sequence's blocks were taken back: a step run ahead before is stale
    adapter_id: int | None = None  # None: the base model
    # A P-Tuning adapter's prefix: the pinned blocks holding its keys and values. They come before block_table:
    # token t's K/V sit at position len(prefix_blocks) * block_size + t, while its rotary position stays t.
    prefix_blocks: list[int] = field(default_factory=list)
    after_prefix: bool = False  # peft's prefix tuning: the rotary positions start after the prefix, at P + t
    # Constrained decoding: the tokens the sampled one may be, as int32 words on the CPU (bit b of word w is
    # id 32*w + b); None: any token. Filled by the engine for this step only: such a row cannot run ahead.
    allowed: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(slots=True)
class Step:
    rows: list[StepRow]
    # The engine reserved each sampling row's next position (its block is in the row's block_table), so the
    # runner may launch the following decode step before this one's tokens are read back.
    run_ahead: bool = False
    released: list[int] = field(default_factory=list)  # seq_ids that finished since the last step


def slot_range(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start..end-1 of a sequence with this block table."""
    return [block_table[t // block_size] * block_size + t % block_size for t in range(start, end)]
