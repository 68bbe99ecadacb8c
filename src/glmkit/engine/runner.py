"""ModelRunner: owns the model and the KV-cache tensors; turns scheduled sequences into one forward pass.

KV cache per layer: k and v of shape [num_blocks * block_size, num_kv_heads, head_dim], addressed by slot
(see BlockManager). Knows tensors and the model; knows nothing of requests' text, chat formats or HTTP.
"""

from __future__ import annotations

import torch

from ..models.layers import AttentionBatch, DecodeGroup, DecoderModel, PromptGroup, SeqSlice
from .block_manager import BlockManager
from .sampler import Sample, Sampler
from .sequence import Sequence


def kv_bytes_per_token(model: DecoderModel, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, kv_dtype: torch.dtype,
                 max_model_len: int = 0, max_num_seqs: int = 1, cuda_graphs: bool = False):
        self.model = model
        self.device = model.embed.weight.device
        self.block_size = block_size
        c = model.config
        # One block more than the block manager hands out: CUDA-graph padding rows write their K/V there.
        shape = ((num_blocks + 1) * block_size, c.num_kv_heads, c.head_dim)
        # zeros, not empty: the whole pool becomes resident now, so memory use is flat from the start instead of
        # creeping up as the block allocator reaches pages it has not touched yet.
        self.kv_caches = [(torch.zeros(shape, dtype=kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=kv_dtype, device=self.device)) for _ in range(c.num_layers)]
        self.sampler = Sampler(invalid_score_token=5 if c.family == "glm" else None)
        self.paged = self.device.type == "cuda"  # decode attention by the Triton kernel over block tables
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

    def _prepare(self, seqs: list[Sequence], blocks: BlockManager):
        input_ids, positions, slots, slices, last_rows = [], [], [], [], []
        decode_rows, decode_seqs = [], []
        for seq in seqs:
            start, end = seq.num_cached, seq.num_cached + seq.num_scheduled
            q_start = len(input_ids)
            input_ids.extend(seq.token_ids(start, end))
            positions.extend(range(start, end))
            slots.extend(blocks.slots(seq, start, end))
            if start > 0 and end - start == 1:  # a decode step: batched with the others
                decode_rows.append(q_start)
                decode_seqs.append(seq)
            else:
                kv_slots = None if start == 0 else torch.tensor(blocks.slots(seq, 0, end), device=self.device)
                slices.append(SeqSlice(q_start, end - start, kv_slots))
            if end == len(seq):  # the chunk reaches the end: this position's logits pick the next token
                last_rows.append(len(input_ids) - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        decode = self._decode_group(decode_rows, decode_seqs, blocks)
        slices, groups = self._group_prompts(slices)
        if decode is not None and not slices and not groups:
            decode.rows = None  # every row is a decode: attention skips the row gather and scatter
        batch = AttentionBatch(as_tensor(slots), slices, decode, groups)
        return as_tensor(input_ids), as_tensor(positions), batch, last_rows

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

    def _decode_group(self, rows: list[int], seqs: list[Sequence], blocks: BlockManager) -> DecodeGroup | None:
        if not rows:
            return None
        lengths = [s.num_cached + 1 for s in seqs]
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
        logits = self._logits(seqs, blocks)
        sampling = [s for s in seqs if s.num_cached + s.num_scheduled == len(s)]
        for seq in seqs:
            seq.num_cached += seq.num_scheduled
            seq.num_scheduled = 0
            blocks.register_full_blocks(seq)
        if not sampling:
            return []
        return list(zip(sampling, self.sampler(logits, sampling)))
