"""ModelRunner: owns the model and the KV-cache tensors; turns scheduled sequences into one forward pass.

KV cache per layer: k and v of shape [num_blocks * block_size, num_kv_heads, head_dim], addressed by slot
(see BlockManager). Knows tensors and the model; knows nothing of requests' text, chat formats or HTTP.

Running a step ahead (`lookahead`, on with CUDA graphs): once a step's tokens are sampled on the GPU, and before
they are read back, the runner launches the next decode step for the same sequences with those tokens as input.
The host then reads the ids and the engine detokenizes, checks stops and schedules while the GPU already computes,
so the GPU does not sit idle between steps. The next run() takes that step's results for every sequence it asks
to decode that step computed (a finished or aborted sequence simply drops out) and runs the model only for the
others (new prompts, prompt chunks, sequences back from preemption), so arrivals cost running streams nothing; a
sequence whose blocks were taken back meanwhile is computed again, which rewrites the K/V of its own slot. Only
tokens the sampler draws in one pass (no penalties, seeds, logprobs or pending min_tokens) run ahead, so an
unused step loses no sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.layers import AttentionBatch, DecodeGroup, DecoderModel, PagedPrefill, PromptGroup, SeqSlice
from .block_manager import BlockManager
from .sampler import Sample, Sampler, to_device
from .sequence import Sequence


def kv_bytes_per_token(model: DecoderModel, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8


@dataclass
class _Ahead:
    """A decode step launched before the engine asked for it."""
    seqs: list[Sequence]
    positions: list[int]      # the position each sequence computes (its length at launch)
    resets: list[int]         # each one's num_resets at launch: blocks taken back since means recompute
    ids: torch.Tensor         # [n] sampled token ids on the device
    host: torch.Tensor        # the same, being copied to (pinned) host memory
    done: torch.cuda.Event | None  # recorded after that copy (None on CPU)

    def covered(self, seqs: list[Sequence]) -> dict[int, int]:
        """{id(seq): its row here} for those of `seqs` whose scheduled step is exactly what this one computed."""
        index = {id(s): i for i, s in enumerate(self.seqs)}
        rows = {}
        for seq in seqs:
            i = index.get(id(seq))
            if (i is not None and seq.num_scheduled == 1 and seq.num_cached == self.positions[i]
                    and len(seq) == seq.num_cached + 1 and seq.num_resets == self.resets[i]):
                rows[id(seq)] = i
        return rows

    def tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


def _read_back(ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ids to the host; (host tensor, event to wait on before reading it)."""
    if not ids.is_cuda:
        return ids, None
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 max_model_len: int = 0, max_num_seqs: int = 1, cuda_graphs: bool = False,
                 lookahead: bool | None = None):
        self.model = model
        self.device = model.embed.weight.device
        self.block_size, self.max_model_len = block_size, max_model_len
        c = model.config
        # One block more than the block manager hands out: CUDA-graph padding rows write their K/V there.
        shape = ((num_blocks + 1) * block_size, c.num_kv_heads, c.head_dim)
        # zeros, not empty: the whole pool becomes resident now, so memory use is flat from the start instead of
        # creeping up as the block allocator reaches pages it has not touched yet.
        self.kv_caches = [(torch.zeros(shape, dtype=kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=kv_dtype, device=self.device)) for _ in range(c.num_layers)]
        self.sampler = Sampler(invalid_score_token=5 if c.family == "glm" else None)
        self.paged = self.device.type == "cuda"  # attention over cached context: Triton kernels reading block tables
        self.graphs = None
        if self.paged:
            model.rotary.ensure(max_model_len)
            # cuDNN's SDPA builds an execution plan for every new prompt-batch shape, a stall of a few hundred ms
            # each time real traffic brings a new mix of lengths; the flash backend needs no plans.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if cuda_graphs and self.paged:
            from .cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv_caches, max_num_seqs, -(-max_model_len // block_size),
                                       block_size, pad_block=num_blocks)
        self.lookahead = self.graphs is not None if lookahead is None else lookahead
        self._ahead: _Ahead | None = None

    def _prepare(self, seqs: list[Sequence], blocks: BlockManager):
        input_ids, positions, slots, slices, last_rows = [], [], [], [], []
        decode_rows, decode_seqs, paged = [], [], []
        for seq in seqs:
            start, end = seq.num_cached, seq.num_cached + seq.num_scheduled
            q_start = len(input_ids)
            input_ids.extend(seq.token_ids(start, end))
            positions.extend(range(start, end))
            slots.extend(blocks.slots(seq, start, end))
            if start > 0 and end - start == 1:  # a decode step: batched with the others
                decode_rows.append(q_start)
                decode_seqs.append(seq)
            elif start > 0 and self.paged:  # after a cached context: attended over the paged cache
                paged.append((q_start, end - start, end, seq.block_table))
            else:
                kv_slots = None if start == 0 else torch.tensor(blocks.slots(seq, 0, end), device=self.device)
                slices.append(SeqSlice(q_start, end - start, kv_slots))
            if end == len(seq):  # the chunk reaches the end: this position's logits pick the next token
                last_rows.append(len(input_ids) - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        decode = self._decode_group(decode_rows, decode_seqs, blocks)
        slices, groups = self._group_prompts(slices)
        if decode is not None and not slices and not groups and not paged:
            decode.rows = None  # every row is a decode: attention skips the row gather and scatter
        batch = AttentionBatch(as_tensor(slots), slices, decode, groups, self._paged_prefill(paged))
        return as_tensor(input_ids), as_tensor(positions), batch, last_rows

    def _paged_prefill(self, items: list[tuple[int, int, int, list[int]]]) -> PagedPrefill | None:
        """(first row, new tokens, context length, block table) per sequence -> the kernel's tensors."""
        if not items:
            return None
        width = max(len(table) for *_, table in items)
        as_int32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=self.device)  # noqa: E731
        starts, lens, contexts, tables = zip(*items)
        return PagedPrefill(as_int32(starts), as_int32(lens), as_int32(contexts),
                            as_int32([t + [0] * (width - len(t)) for t in tables]), max(lens), self.block_size)

    def _group_prompts(self, slices: list[SeqSlice]) -> tuple[list[SeqSlice], list[PromptGroup]]:
        """Whole prompts of equal length (many requests arriving together) -> one attention call per length."""
        by_length: dict[int, list[SeqSlice]] = {}
        for s in slices:
            if s.kv_slots is None:
                by_length.setdefault(s.q_len, []).append(s)
        groups = []
        for length, members in by_length.items():
            if len(members) > 1:
                rows = [r for s in members for r in range(s.q_start, s.q_start + length)]
                groups.append(PromptGroup(torch.tensor(rows, device=self.device), len(members), length))
        grouped = {id(s) for g in by_length.values() if len(g) > 1 for s in g}
        return [s for s in slices if id(s) not in grouped], groups

    def _decode_group(self, rows: list[int], seqs: list[Sequence], blocks: BlockManager,
                      lengths: list[int] | None = None) -> DecodeGroup | None:
        if not rows:
            return None
        lengths = lengths or [s.num_cached + 1 for s in seqs]
        row_ids = torch.tensor(rows, device=self.device)
        if self.paged:
            width = max(len(s.block_table) for s in seqs)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
            return DecodeGroup(row_ids, block_tables=torch.tensor(tables, dtype=torch.int32, device=self.device),
                               context_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
                               block_size=self.block_size)
        longest = max(lengths)
        slot_lists = [blocks.slots(s, 0, n) for s, n in zip(seqs, lengths)]
        padded = [s + [0] * (longest - len(s)) for s in slot_lists]  # slot 0 stands in; the mask hides it
        mask = None
        if any(n != longest for n in lengths):
            lens = torch.tensor(lengths, device=self.device)
            mask = (torch.arange(longest, device=self.device)[None, :] < lens[:, None])[:, None, None, :]
        return DecodeGroup(row_ids, torch.tensor(padded, device=self.device), mask)

    def _logits(self, seqs: list[Sequence], blocks: BlockManager) -> torch.Tensor | None:
        """Run the scheduled tokens; the logits of the rows that pick a next token (None if no row does)."""
        if self.graphs is not None and all(s.num_scheduled == 1 and 0 < s.num_cached == len(s) - 1 for s in seqs) \
                and self.graphs.can_run(len(seqs)):
            positions = [s.num_cached for s in seqs]
            bs = self.block_size
            return self.graphs.run([s.output_ids[-1] if s.output_ids else s.prompt_ids[-1] for s in seqs],
                                   positions, [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)],
                                   [s.block_table for s in seqs])
        input_ids, positions, batch, last_rows = self._prepare(seqs, blocks)
        hidden = self.model(input_ids, positions, batch, self.kv_caches)
        return self.model.compute_logits(hidden[last_rows]) if last_rows else None

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], blocks: BlockManager) -> list[tuple[Sequence, Sample]]:
        """Compute the scheduled tokens of every sequence; sample for those whose prompt is now complete."""
        ahead, self._ahead = self._ahead, None
        covered = ahead.covered(seqs) if ahead is not None else {}  # decodes already computed ahead
        rest = [s for s in seqs if id(s) not in covered]
        logits = self._logits(rest, blocks) if rest else None
        sampling = [s for s in seqs if s.num_cached + s.num_scheduled == len(s)]
        for seq in seqs:
            seq.num_cached += seq.num_scheduled
            seq.num_scheduled = 0
            blocks.register_full_blocks(seq)
        if not sampling:
            return []
        fresh = [s for s in sampling if id(s) not in covered]  # the rows of `logits`, in order
        tokens: dict[int, Sample] = {}
        if fresh and not (self.lookahead and self.sampler.batchable(fresh)):
            tokens = dict(zip(map(id, fresh), self.sampler(logits, fresh)))  # reads back now; nothing runs ahead
        else:
            fresh_ids = self.sampler.sample_ids(logits, fresh) if fresh else None
            fresh_host, fresh_done = _read_back(fresh_ids) if fresh else (None, None)
            if self.lookahead:
                self._ahead = self._launch_ahead(sampling, self._ids(sampling, covered, ahead, fresh_ids), blocks)
            if fresh:
                if fresh_done is not None:
                    fresh_done.synchronize()
                tokens = {id(s): Sample(t) for s, t in zip(fresh, fresh_host.tolist())}
        if covered:
            host = ahead.tokens()
            tokens.update((key, Sample(host[row])) for key, row in covered.items())
        return [(seq, tokens[id(seq)]) for seq in sampling]

    @staticmethod
    def _ids(sampling: list[Sequence], covered: dict[int, int], ahead: _Ahead | None,
             fresh_ids: torch.Tensor | None) -> torch.Tensor:
        """The sampled ids of `sampling`, in its order, on the device: rows of the step computed ahead for the
        covered sequences, the fresh samples for the others."""
        if not covered:
            return fresh_ids
        ahead_rows = [covered[id(s)] for s in sampling if id(s) in covered]
        old = ahead.ids
        if ahead_rows != list(range(len(ahead.seqs))):
            old = old.index_select(0, to_device(ahead_rows, torch.long, old.device))
        if fresh_ids is None:
            return old
        ids = torch.empty(len(sampling), dtype=old.dtype, device=old.device)
        where = [i for i, s in enumerate(sampling) if id(s) in covered]
        ids.index_copy_(0, to_device(where, torch.long, ids.device), old)
        where = [i for i, s in enumerate(sampling) if id(s) not in covered]
        ids.index_copy_(0, to_device(where, torch.long, ids.device), fresh_ids)
        return ids

    def _launch_ahead(self, seqs: list[Sequence], ids: torch.Tensor, blocks: BlockManager) -> _Ahead | None:
        """Start the decode step that follows, with `ids` (just sampled, still on the device) as its input."""
        if self.graphs is not None and not self.graphs.can_run(len(seqs)):
            return None
        if not self.sampler.batchable(seqs, ahead=1):
            return None
        if all(len(s) + 1 >= self.max_model_len or (s.params.max_tokens is not None
                                                    and len(s.output_ids) + 1 >= s.params.max_tokens)
               for s in seqs):
            return None  # every one of them stops at the token being sampled
        positions = [len(s) for s in seqs]  # the sampled token's position: the next step computes it
        new_blocks = sum(max(blocks.blocks_needed(p + 1) - len(s.block_table), 0) for s, p in zip(seqs, positions))
        if new_blocks > blocks.num_free or max(positions) >= self.max_model_len:
            return None
        for seq, p in zip(seqs, positions):
            blocks.allocate(seq, p + 1)
        bs = self.block_size
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)]
        if self.graphs is not None:
            logits = self.graphs.run(ids, positions, slots, [s.block_table for s in seqs])
        else:
            decode = self._decode_group(list(range(len(seqs))), seqs, blocks, [p + 1 for p in positions])
            decode.rows = None
            batch = AttentionBatch(to_device(slots, torch.long, self.device), [], decode)
            hidden = self.model(ids, to_device(positions, torch.long, self.device), batch, self.kv_caches)
            logits = self.model.compute_logits(hidden)
        next_ids = self.sampler.sample_ids(logits, seqs)
        host, done = _read_back(next_ids)
        return _Ahead(list(seqs), positions, [s.num_resets for s in seqs], next_ids, host, done)
