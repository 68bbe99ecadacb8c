"""ModelRunner: owns the model and the KV-cache tensors; turns scheduled sequences into one forward pass.

KV cache per layer: k and v of shape [num_blocks * block_size, num_kv_heads, head_dim], addressed by slot
(see BlockManager). Knows tensors and the model; knows nothing of requests' text, chat formats or HTTP.
"""

from __future__ import annotations


import torch

from ..models.layers import AttentionBatch, DecodeGroup, DecoderModel, SeqSlice
from .block_manager import BlockManager
from .sampler import Sample, Sampler
from .sequence import Sequence



def kv_bytes_per_token(model: DecoderModel, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, kv_dtype: torch.dtype):
        self.model = model
        self.device = model.embed.weight.device
        self.block_size = block_size
        c = model.config
        shape = (num_blocks * block_size, c.num_kv_heads, c.head_dim)
        # zeros, not empty: the whole pool becomes resident now, so memory use is flat from the start instead of
        # creeping up as the block allocator reaches pages it has not touched yet.
        self.kv_caches = [(torch.zeros(shape, dtype=kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=kv_dtype, device=self.device)) for _ in range(c.num_layers)]
        self.sampler = Sampler(invalid_score_token=5 if c.family == "glm" else None)

    def _prepare(self, seqs: list[Sequence], blocks: BlockManager):
        input_ids, positions, slots, slices, last_rows = [], [], [], [], []
        decode_rows, decode_slots = [], []
        for seq in seqs:
            start, end = seq.num_cached, seq.num_cached + seq.num_scheduled
            q_start = len(input_ids)
            input_ids.extend(seq.all_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(blocks.slots(seq, start, end))
            if start > 0 and end - start == 1:  # a decode step: batched with the others
                decode_rows.append(q_start)
                decode_slots.append(blocks.slots(seq, 0, end))
            else:
                kv_slots = None if start == 0 else torch.tensor(blocks.slots(seq, 0, end), device=self.device)
                slices.append(SeqSlice(q_start, end - start, kv_slots))
            if end == len(seq):  # the chunk reaches the end: this position's logits pick the next token
                last_rows.append(len(input_ids) - 1)
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        batch = AttentionBatch(as_tensor(slots), slices, self._decode_group(decode_rows, decode_slots))
        return as_tensor(input_ids), as_tensor(positions), batch, as_tensor(last_rows)

    def _decode_group(self, rows: list[int], slot_lists: list[list[int]]) -> DecodeGroup | None:
        if not rows:
            return None
        longest = max(len(s) for s in slot_lists)
        padded = [s + [0] * (longest - len(s)) for s in slot_lists]  # slot 0 stands in; the mask hides it
        mask = None
        if any(len(s) != longest for s in slot_lists):
            lengths = torch.tensor([len(s) for s in slot_lists], device=self.device)
            mask = (torch.arange(longest, device=self.device)[None, :] < lengths[:, None])[:, None, None, :]
        return DecodeGroup(torch.tensor(rows, device=self.device), torch.tensor(padded, device=self.device), mask)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], blocks: BlockManager) -> list[tuple[Sequence, Sample]]:
        """Compute the scheduled tokens of every sequence; sample for those whose prompt is now complete."""
        input_ids, positions, batch, last_rows = self._prepare(seqs, blocks)
        hidden = self.model(input_ids, positions, batch, self.kv_caches)
        sampling = [s for s in seqs if s.num_cached + s.num_scheduled == len(s)]
        for seq in seqs:
            seq.num_cached += seq.num_scheduled
            seq.num_scheduled = 0
            blocks.register_full_blocks(seq)
        if not sampling:
            return []
        logits = self.model.compute_logits(hidden[last_rows])
        return list(zip(sampling, self.sampler(logits, sampling)))
