"""CUDA graphs of the decode step: one captured forward (model + output layer) per batch size.

A decode-only step (every running sequence adds one token) is the common step under load and the one where
launch overhead dominates. Each graph reads fixed input buffers (token ids, positions, KV slots, block
tables, context lengths) that `run` fills before the replay; a batch is padded up to the next captured size,
and the padding rows write their K/V into a scratch block that no sequence owns.

With pooled LoRA adapters (models/adapters.py) a second graph per size is captured with the LoRA kernel in every
adapted linear, reading each row's adapter slot (and the rows grouped by slot) from more fixed buffers. Steps
without a LoRA row replay the first set, so the base model pays nothing for adapters being loaded.

A model with quantized weights is captured with programmatic dependent launch (kernels/pdl.py: each kernel
starts while the one before it finishes), which measured faster for int4 and int8 and slower for bf16.
"""

from __future__ import annotations

import logging
import time

import torch

from ..kernels import pdl
from ..kernels.lora import LoraRows, group_rows
from ..models.layers import AttentionBatch, DecodeGroup, DecoderModel
from ..models.quant import QuantLinear

log = logging.getLogger("glmkit")


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 256, 16)) + list(range(256, 1025, 64))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: DecoderModel, kv_caches, max_num_seqs: int, max_blocks: int, block_size: int,
                 pad_block: int, adapters=None):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.sizes = capture_sizes(max_num_seqs)
        device, n = model.embed.weight.device, max_num_seqs
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), pad_block * block_size, dtype=torch.long, device=device)
        self.block_tables = torch.full((n, max_blocks), pad_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.pad_slot, self.pad_block = pad_block * block_size, pad_block
        self.num_slots = adapters.slots if adapters is not None else 0
        self.lora_rows = LoraRows(torch.full((n,), -1, dtype=torch.int32, device=device),
                                  torch.zeros(n, dtype=torch.int32, device=device),
                                  torch.zeros(self.num_slots + 1, dtype=torch.int32, device=device))
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = {"base": 0, "lora": 0}  # steps run by each set (benchmarks report them)
        self.quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            pool = self._capture(size, self.graphs, pool)
            if adapters is not None:
                with adapters.rows(self.lora_rows):
                    pool = self._capture(size, self.lora_graphs, pool)
        torch.cuda.synchronize(device)
        log.info("glmkit: captured CUDA graphs for %d decode batch sizes (1..%d)%s in %.1f s", len(self.sizes),
                 max_num_seqs, ", with and without LoRA adapters," if adapters is not None else "",
                 time.perf_counter() - start)

    def _capture(self, size: int, into: dict, pool):
        with pdl.scope(self.quantized):
            self._forward(size)  # warm-up: compiles the Triton kernels for this size outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
        into[size] = (graph, logits)
        return graph.pool()

    def _forward(self, size: int) -> torch.Tensor:
        batch = AttentionBatch(self.slots[:size], [], DecodeGroup(
            rows=None, block_tables=self.block_tables[:size], context_lens=self.context_lens[:size],
            block_size=self.block_size))
        hidden = self.model(self.input_ids[:size], self.positions[:size], batch, self.kv_caches)
        return self.model.compute_logits(hidden)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def run(self, input_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int],
            tables: list[list[int]], context_lens: list[int], lora_slots: list[int] | None = None) -> torch.Tensor:
        """One decode step for len(positions) sequences -> their logits [n, vocab] (valid until the next run).

        input_ids may be a host list or a tensor already on the device (the tokens just sampled, when the
        runner launches a step ahead). `lora_slots`: each row's adapter slot (-1: none), or None for a step
        without LoRA rows. Nothing here waits for the GPU: the host data goes through pinned memory.
        """
        n = len(positions)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        # Only the columns some sequence uses: the kernel reads a row no further than its context length, so
        # whatever an earlier step left beyond that is never looked at. Padding rows attend to the scratch block.
        width = max(len(t) for t in tables)
        rows = [t + [self.pad_block] * (width - len(t)) for t in tables] + [[self.pad_block] * width] * pad
        host = [positions + [0] * pad, slots + [self.pad_slot] * pad, context_lens + [1] * pad]
        if lora_slots is not None:  # padding rows have no adapter
            lora_slots = lora_slots + [-1] * pad
            order, starts = group_rows(lora_slots, self.num_slots)
            host += [lora_slots, order + [0] * (size - len(order))]
        on_device = isinstance(input_ids, torch.Tensor)
        if not on_device:
            host.append(input_ids + [0] * pad)  # the last row
        host = torch.tensor(host, dtype=torch.long).pin_memory()
        self.positions[:size].copy_(host[0], non_blocking=True)
        self.slots[:size].copy_(host[1], non_blocking=True)
        self.context_lens[:size].copy_(host[2], non_blocking=True)
        if lora_slots is not None:
            self.lora_rows.slots[:size].copy_(host[3], non_blocking=True)
            self.lora_rows.order[:size].copy_(host[4], non_blocking=True)
            self.lora_rows.starts.copy_(torch.tensor(starts, dtype=torch.int32).pin_memory(), non_blocking=True)
        if on_device:  # padding rows keep whatever ids an earlier step left: valid tokens, and never read back
            self.input_ids[:n].copy_(input_ids)
        else:
            self.input_ids[:size].copy_(host[-1], non_blocking=True)
        self.block_tables[:size, :width].copy_(torch.tensor(rows, dtype=torch.int32).pin_memory(), non_blocking=True)
        graph, logits = (self.graphs if lora_slots is None else self.lora_graphs)[size]
        self.replays["base" if lora_slots is None else "lora"] += 1
        graph.replay()
        return logits[:n]
