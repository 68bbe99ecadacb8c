"""ModelRunner: owns the model and the KV-cache tensors; turns a Step (plain values, see step.py) into one
forward pass and returns the sampled ids. It never sees a Sequence or the BlockManager and keeps no cache
bookkeeping: what is cached and which blocks a sequence holds come in the step, decided by the engine.

KV cache per layer: k and v of shape [num_blocks * block_size, num_kv_heads, head_dim], addressed by slot
(block_table[t // block_size] * block_size + t % block_size). Knows tensors and the model; knows nothing of
requests' text, chat formats or HTTP.

Running a step ahead (`lookahead`, on with CUDA graphs): once a step's tokens are sampled on the GPU, and before
they are read back, the runner launches the next decode step for the same sequences with those tokens as input.
The host then reads the ids and the engine detokenizes, checks stops and schedules while the GPU already computes,
so the GPU does not sit idle between steps. The next run() takes that step's results for every sequence it asks
to decode that step computed (a finished or aborted sequence simply drops out) and runs the model only for the
others (new prompts, prompt chunks, sequences back from preemption), so arrivals cost running streams nothing; a
sequence whose blocks were taken back meanwhile is computed again, which rewrites the K/V of its own slot. The
engine reserves the block for that next position before the step (Step.run_ahead); the runner only uses it. Only
tokens the sampler draws in one pass (no penalties, seeds, logprobs or pending min_tokens) run ahead, so an
unused step loses no sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.adapters import ServedAdapters
from ..models.layers import AttentionBatch, DecodeGroup, DecoderModel, PagedPrefill, PromptGroup, SeqSlice
from .sampler import Sample, Sampler, to_device
from .step import Step, StepRow, slot_range


def kv_bytes_per_token(model: DecoderModel, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8


@dataclass
class _Ahead:
    """A decode step launched before the engine asked for it."""
    seq_ids: list[int]
    positions: list[int]      # the position each sequence computes (its length at launch)
    resets: list[int]         # each one's num_resets at launch: blocks taken back since means recompute
    ids: torch.Tensor         # [n] sampled token ids on the device
    host: torch.Tensor        # the same, being copied to (pinned) host memory
    done: torch.cuda.Event | None  # recorded after that copy (None on CPU)

    def covered(self, rows: list[StepRow]) -> dict[int, int]:
        """{seq_id: its row here} for those of `rows` whose scheduled step is exactly what this one computed."""
        index = {seq_id: i for i, seq_id in enumerate(self.seq_ids)}
        covered = {}
        for row in rows:
            i = index.get(row.seq_id)
            if (i is not None and row.sample and len(row.token_ids) == 1 and row.start == self.positions[i]
                    and row.num_resets == self.resets[i]):
                covered[row.seq_id] = i
        return covered

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
                 lookahead: bool | None = None, adapter_slots: int = 0, max_lora_rank: int = 16):
        self.model = model
        self.device = model.embed.weight.device
        # LoRA adapters beside the base, by engine id; in pools of `adapter_slots` for the CUDA graphs (0: none)
        self.adapters = ServedAdapters(model, adapter_slots, max_lora_rank)
        self.block_size, self.max_model_len = block_size, max_model_len
        c = model.config
        self.vocab_size = c.vocab_size
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
                                       block_size, pad_block=num_blocks,
                                       adapters=self.adapters if self.adapters.pooled else None)
        self.lookahead = self.graphs is not None if lookahead is None else lookahead
        self._ahead: _Ahead | None = None

    def _prepare(self, rows: list[StepRow]):
        input_ids, positions, slots, slices, last_rows = [], [], [], [], []
        decode_rows, decode_tables, decode_lens, paged = [], [], [], []
        bs = self.block_size
        for row in rows:
            q_start = len(input_ids)
            input_ids.extend(row.token_ids)
            table = row.prefix_blocks + row.block_table if row.prefix_blocks else row.block_table
            skip = len(row.prefix_blocks) * bs  # the prefix's K/V come first in the cache
            shift = skip if row.after_prefix else 0  # a ChatGLM prefix takes no rotary positions, peft's does
            positions.extend(range(row.start + shift, row.end + shift))
            start, end = row.start + skip, row.end + skip
            slots.extend(slot_range(table, start, end, bs))
            if start > 0 and end - start == 1:  # a decode step: batched with the others
                decode_rows.append(q_start)
                decode_tables.append(table)
                decode_lens.append(end)
            elif start > 0 and self.paged:  # after a cached context (or a prefix): attended over the paged cache
                paged.append((q_start, end - start, end, table))
            else:
                kv_slots = None if start == 0 else torch.tensor(slot_range(table, 0, end, bs), device=self.device)
                slices.append(SeqSlice(q_start, end - start, kv_slots))
            if row.sample:  # the chunk reaches the end: this position's logits pick the next token
                last_rows.append(len(input_ids) - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        decode = self._decode_group(decode_rows, decode_tables, decode_lens)
        slices, groups = self._group_prompts(slices)
        if decode is not None and not slices and not groups and not paged:
            decode.rows = None  # every row is a decode: attention skips the row gather and scatter
        batch = AttentionBatch(as_tensor(slots), slices, decode, groups, self._paged_prefill(paged))
        return as_tensor(input_ids), as_tensor(positions), batch, last_rows

    @torch.inference_mode()
    def write_prefix(self, blocks: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put a P-Tuning prefix's keys and values (per layer [P, kv heads, head dim], unrotated, as ChatGLM
        attends to them) into these pinned blocks, once for every request of its adapter."""
        slots = torch.tensor(slot_range(blocks, 0, len(blocks) * self.block_size, self.block_size),
                             device=self.device)
        for (k_cache, v_cache), (k, v) in zip(self.kv_caches, kv):
            k_cache.index_copy_(0, slots, k.to(k_cache.device, k_cache.dtype))
            v_cache.index_copy_(0, slots, v.to(v_cache.device, v_cache.dtype))

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

    def _decode_group(self, rows: list[int], tables: list[list[int]], lengths: list[int]) -> DecodeGroup | None:
        """Decode rows attending to their first `lengths` positions, held in the blocks of `tables`."""
        if not rows:
            return None
        row_ids = torch.tensor(rows, device=self.device)
        if self.paged:
            width = max(len(t) for t in tables)
            padded = [t + [0] * (width - len(t)) for t in tables]
            return DecodeGroup(row_ids, block_tables=torch.tensor(padded, dtype=torch.int32, device=self.device),
                               context_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
                               block_size=self.block_size)
        longest = max(lengths)
        slot_lists = [slot_range(t, 0, n, self.block_size) for t, n in zip(tables, lengths)]
        padded = [s + [0] * (longest - len(s)) for s in slot_lists]  # slot 0 stands in; the mask hides it
        mask = None
        if any(n != longest for n in lengths):
            lens = torch.tensor(lengths, device=self.device)
            mask = (torch.arange(longest, device=self.device)[None, :] < lens[:, None])[:, None, None, :]
        return DecodeGroup(row_ids, torch.tensor(padded, device=self.device), mask,
                           context_lens=torch.tensor(lengths, device=self.device))

    def _decode_inputs(self, rows: list[StepRow], positions: list[int]):
        """(rotary positions, slots, block tables, context lengths) of decode rows computing these positions; a
        prefix's blocks come first in the table and shift the row's cache positions (and for peft's prefix
        tuning its rotary ones too)."""
        bs, rotary, slots, tables, lens = self.block_size, [], [], [], []
        for r, p in zip(rows, positions):
            table = r.prefix_blocks + r.block_table if r.prefix_blocks else r.block_table
            at = p + len(r.prefix_blocks) * bs
            rotary.append(at if r.after_prefix else p)
            slots.append(table[at // bs] * bs + at % bs)
            tables.append(table)
            lens.append(at + 1)
        return rotary, slots, tables, lens

    def _graphable(self, rows: list[StepRow], loras: list[int] | None = None) -> bool:
        """Whether these rows' adapters (`loras`: their LoRAs, if already known) can run in the captured graphs:
        none is a LoRA, or LoRAs are pooled and fit the slots."""
        if loras is None:
            loras = self.adapters.lora_ids(r.adapter_id for r in rows)
        return not loras or (self.adapters.pooled and len(loras) <= self.adapters.slots)

    def _logits(self, rows: list[StepRow]) -> torch.Tensor | None:
        """Run the rows' tokens; the logits of the rows that pick a next token (None if no row does)."""
        loras = self.adapters.lora_ids(r.adapter_id for r in rows)
        if self.adapters.pooled and len(loras) > self.adapters.slots:
            return self._logits_in_parts(rows, loras)
        if self.graphs is not None and self._graphable(rows, loras) \
                and all(r.sample and len(r.token_ids) == 1 and r.start > 0 for r in rows) \
                and self.graphs.can_run(len(rows)):
            lora_slots = self.adapters.slots_of([r.adapter_id for r in rows]) if loras else None
            return self.graphs.run([r.token_ids[0] for r in rows], *self._decode_inputs(rows, [r.start for r in rows]),
                                   lora_slots)
        input_ids, positions, batch, last_rows = self._prepare(rows)
        if loras:  # each token row through its own adapter
            with self.adapters.batch([r.adapter_id for r in rows for _ in r.token_ids], self.device):
                hidden = self.model(input_ids, positions, batch, self.kv_caches)
        else:
            hidden = self.model(input_ids, positions, batch, self.kv_caches)
        return self.model.compute_logits(hidden[last_rows]) if last_rows else None

    def _logits_in_parts(self, rows: list[StepRow], loras: list[int]) -> torch.Tensor | None:
        """More LoRAs in a step than slots: passes of at most `slots` adapters each (the rows are independent),
        their logits put back in row order."""
        per_pass = self.adapters.slots
        parts = [set(loras[i:i + per_pass]) for i in range(0, len(loras), per_pass)]
        parts[0].add(None)  # rows of the base or a P-Tuning prefix go with the first pass
        order, pieces = [], []
        for part in parts:
            mine = [i for i, r in enumerate(rows) if (r.adapter_id if r.adapter_id in loras else None) in part]
            logits = self._logits([rows[i] for i in mine])
            if logits is not None:
                pieces.append(logits)
                order.extend(i for i in mine if rows[i].sample)
        if not pieces:
            return None
        sampled = [i for i, r in enumerate(rows) if r.sample]
        where = {row: k for k, row in enumerate(order)}
        return torch.cat(pieces).index_select(0, to_device([where[i] for i in sampled], torch.long, self.device))

    @torch.inference_mode()
    def run(self, step: Step) -> list[Sample]:
        """Compute every row's tokens; one Sample for each row with `sample` set, in row order."""
        for seq_id in step.released:
            self.sampler.forget(seq_id)
        ahead, self._ahead = self._ahead, None
        covered = ahead.covered(step.rows) if ahead is not None else {}  # decodes already computed ahead
        rest = [r for r in step.rows if r.seq_id not in covered]
        logits = self._logits(rest) if rest else None
        sampling = [r for r in step.rows if r.sample]
        if not sampling:
            return []
        fresh = [r for r in sampling if r.seq_id not in covered]  # the rows of `logits`, in order
        tokens: dict[int, Sample] = {}
        if fresh and not (self.lookahead and self.sampler.batchable(fresh)):
            tokens = dict(zip((r.seq_id for r in fresh), self.sampler(logits, fresh)))  # reads back now
        else:
            fresh_ids = self.sampler.sample_ids(logits, fresh) if fresh else None
            fresh_host, fresh_done = _read_back(fresh_ids) if fresh else (None, None)
            if self.lookahead and step.run_ahead and self._graphable(sampling):
                self._ahead = self._launch_ahead(sampling, self._ids(sampling, covered, ahead, fresh_ids))
            if fresh:
                if fresh_done is not None:
                    fresh_done.synchronize()
                tokens = {r.seq_id: Sample(t) for r, t in zip(fresh, fresh_host.tolist())}
        if covered:
            host = ahead.tokens()
            tokens.update((seq_id, Sample(host[i])) for seq_id, i in covered.items())
        return [tokens[r.seq_id] for r in sampling]

    @staticmethod
    def _ids(sampling: list[StepRow], covered: dict[int, int], ahead: _Ahead | None,
             fresh_ids: torch.Tensor | None) -> torch.Tensor:
        """The sampled ids of `sampling`, in its order, on the device: rows of the step computed ahead for the
        covered sequences, the fresh samples for the others."""
        if not covered:
            return fresh_ids
        ahead_rows = [covered[r.seq_id] for r in sampling if r.seq_id in covered]
        old = ahead.ids
        if ahead_rows != list(range(len(ahead.seq_ids))):
            old = old.index_select(0, to_device(ahead_rows, torch.long, old.device))
        if fresh_ids is None:
            return old
        ids = torch.empty(len(sampling), dtype=old.dtype, device=old.device)
        where = [i for i, r in enumerate(sampling) if r.seq_id in covered]
        ids.index_copy_(0, to_device(where, torch.long, ids.device), old)
        where = [i for i, r in enumerate(sampling) if r.seq_id not in covered]
        ids.index_copy_(0, to_device(where, torch.long, ids.device), fresh_ids)
        return ids

    def _launch_ahead(self, rows: list[StepRow], ids: torch.Tensor) -> _Ahead | None:
        """Start the decode step that follows, with `ids` (just sampled, still on the device) as its input. The
        engine has already put the block of each row's next position into its block table."""
        if self.graphs is not None and not self.graphs.can_run(len(rows)):
            return None
        if not self.sampler.batchable(rows, ahead=1):
            return None
        positions = [r.end for r in rows]  # the sampled token's position: the next step computes it
        rotary, slots, tables, lens = self._decode_inputs(rows, positions)
        lora_slots = self.adapters.slots_of([r.adapter_id for r in rows]) if self.adapters.pooled else None
        if self.graphs is not None:
            logits = self.graphs.run(ids, rotary, slots, tables, lens, lora_slots)
        else:
            decode = self._decode_group(list(range(len(rows))), tables, lens)
            decode.rows = None
            batch = AttentionBatch(to_device(slots, torch.long, self.device), [], decode)
            with self.adapters.batch([r.adapter_id for r in rows], self.device):
                hidden = self.model(ids, to_device(rotary, torch.long, self.device), batch, self.kv_caches)
            logits = self.model.compute_logits(hidden)
        next_ids = self.sampler.sample_ids(logits, rows)
        host, done = _read_back(next_ids)
        return _Ahead([r.seq_id for r in rows], positions, [r.num_resets for r in rows], next_ids, host, done)
