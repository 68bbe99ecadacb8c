"""Serving LoRA adapters beside the base model: many at once, mixed in one batch, each row computed with its own.

`ServedAdapters` holds the loaded adapters of one model by engine id. Loading an adapter (a peft LoRA read by
lora.read_adapter) maps its checkpoint module names onto glmkit's fused linears (lora.targets_of, as training
does) and stores, per linear, the adapter's stacked A [targets * r, in] and block-diagonal B [out, targets * r]
in the activations' dtype. The first adapter that touches a linear wraps it in an `AdapterLinear`; the wrapper
adds nothing while the batch holds no adapter rows, so a base-only step costs what it did and the CUDA graphs
captured before any adapter stay valid.

Before a forward pass the runner says which adapter each token row uses (`batch`); every AdapterLinear then adds
each adapter's update to its own rows: a gather of those rows, two small products, a scatter-add. Rows of the
base model are left alone. Knows nothing of the engine, requests or names.

Pooled (on CUDA, `slots` > 0): every linear a LoRA can adapt is wrapped at once, with weight pools of `slots`
adapters of rank up to `max_rank` allocated up front (kernels/lora.py), so CUDA graphs captured with the LoRA
kernel in them replay for any mix of resident adapters: only the rows' slots change. Every
loaded adapter keeps a copy in pinned host memory; `slots_of` makes a step's adapters resident, copying one in
over the least recently used one not in the step when all slots are taken (an ordinary copy on the stream, after
the kernels already queued that read the slot).

`read_served_adapter` reads either kind of adapter directory; a P-Tuning v2 prefix is not held here but in KV
blocks the engine pins for it (LLMEngine.add_adapter).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelLoadError
from .lora import Adapter, LoraLinear, fused_parts, read_adapter, targets_of
from .peft_prefix import is_peft_prefix_dir, read_peft_prefix
from .ptuning import PrefixAdapter, is_prefix_dir, read_prefix


def _host(t: torch.Tensor, dtype, device) -> torch.Tensor:
    """A slot's copy kept in host memory: pinned when the slots are on a GPU, so copying it in does not wait."""
    t = t.to(dtype).contiguous()
    return t.pin_memory() if device.type == "cuda" else t


def _cuda_gemv():
    from ..kernels.gemv import gemv

    return gemv


def read_served_adapter(directory, config) -> Adapter | PrefixAdapter:
    """An adapter directory as it was saved: a peft LoRA or prefix tuning (adapter_config.json) or ChatGLM's
    P-Tuning v2 (config.json with pre_seq_len), for a model of `config`."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; pass what a fine-tuning saved (glmkit finetune's "
                             "--output, peft's save_pretrained, or ChatGLM's P-Tuning v2 checkpoint)")
    if is_prefix_dir(path) and not (path / "adapter_config.json").is_file():
        return read_prefix(path, config)
    if is_peft_prefix_dir(path):
        return read_peft_prefix(path, config)
    return read_adapter(path)


@dataclass
class _Weights:
    a: torch.Tensor      # [targets * r, in]
    b: torch.Tensor      # [out, targets * r], zero outside each target's rows
    scale: float


class _Batch:
    """Which rows of the current forward pass each adapter computes: (adapter id, row indices or None for all);
    pooled, each row's slot instead (kernels/lora.py's LoraRows; None when no row has a LoRA)."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        self.rows = None


class _Pool:
    """One linear's share of the adapter slots: A [slots, W, in], B transposed [slots, W, out] (scale folded in),
    zero beyond each adapter's rank (and all zero where the slot's adapter leaves this linear alone).

    For a float linear on CUDA, A sits in one buffer under the base weight (`ext` [out + slots * W, in]; the base
    keeps the first `out` rows as its weight, a view), so a step gets the base output and every slot's A @ x from
    one GEMV (one row) or GEMM (more) that reads 1-3% more bytes, and only the expand kernel is added: the extra
    kernel launches, not the bytes, are what adapters cost (at 64 rows the shrink kernel this replaces cost about
    as much as the expand)."""

    def __init__(self, slots: int, width: int, base: nn.Module, dtype, device):
        from .layers import Linear

        n, k = base.out_features, base.in_features
        self.b = torch.zeros(slots, width, n, dtype=dtype, device=device)
        self.ext = self.ext_bias = None
        w = getattr(base, "weight", None)
        if device.type == "cuda" and type(base) is Linear and w.dtype in (torch.bfloat16, torch.float16):
            self.ext = torch.zeros(n + slots * width, k, dtype=w.dtype, device=device)
            self.ext[:n].copy_(w.data)
            base.weight.data = self.ext[:n]  # the same values, now inside ext
            if base.bias is not None:
                self.ext_bias = torch.zeros(n + slots * width, dtype=w.dtype, device=device)
                self.ext_bias[:n].copy_(base.bias.data)
                base.bias.data = self.ext_bias[:n]
            self.a = self.ext[n:].view(slots, width, k)
        else:
            self.a = torch.zeros(slots, width, k, dtype=dtype, device=device)


class AdapterLinear(nn.Module):
    """A linear (float or quantized) plus, for the rows of each adapter in the batch, that adapter's update."""

    def __init__(self, base: nn.Module, batch: _Batch, pool: _Pool | None = None):
        super().__init__()
        self.base, self._batch, self.pool = base, batch, pool
        self.weights: dict[int, _Weights] = {}  # unpooled: on the device; pooled: in pinned host memory

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool
        if p is not None and self._batch.rows is not None:
            from ..kernels import lora

            if p.ext is not None and x.dtype == p.ext.dtype:  # one product: base and every slot's A
                out = _cuda_gemv()(x, p.ext, p.ext_bias) if x.shape[0] == 1 else F.linear(x, p.ext, p.ext_bias)
                n = self.out_features
                y = lora.expand(out[:, :n], out[:, n:], p.b, self._batch.rows)
                return y if x.shape[0] == 1 else y.contiguous()  # the next layers take whole rows
            return lora.add_lora(self.base(x), x, p.a, p.b, self._batch.rows)
        y = self.base(x)
        if p is not None:
            return y
        for adapter_id, rows in self._batch.groups:
            w = self.weights.get(adapter_id)
            if w is None:  # this adapter does not adapt this linear
                continue
            if rows is None:  # every row is this adapter's (the same arithmetic per row as below)
                y.add_((x @ w.a.t()) @ w.b.t(), alpha=w.scale)
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ w.a.t()) @ w.b.t(), alpha=w.scale)
        return y


class ServedAdapters:
    """The LoRA adapters loaded into one model, by engine id; pooled with `slots` > 0 (see the module docstring)."""

    def __init__(self, model: nn.Module, slots: int = 0, max_rank: int = 16):
        self.model = model
        self._batch = _Batch()
        self._linears: dict[str, AdapterLinear] = {}  # glmkit module path -> its wrapper
        self.loaded: set[int] = set()  # ids only: the weights live in the wrappers (the read copy is let go)
        self.slots, self.max_rank = slots, max_rank
        self._resident: OrderedDict[int, int] = OrderedDict()  # adapter id -> its slot, least recently used first
        if slots:
            device, dtype = model.embed.weight.device, model.embed.weight.dtype
            config = model.config
            for i in range(config.num_layers):
                for name in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"):
                    module = f"layers.{i}.{name}"
                    linear = model.get_submodule(module)
                    width = max_rank * fused_parts(config, module)
                    self._wrapper(module, _Pool(slots, width, linear, dtype, device))

    @property
    def pooled(self) -> bool:
        return self.slots > 0

    def add(self, adapter_id: int, adapter: Adapter) -> None:
        """Load an adapter's weights under `adapter_id`. Raises ModelLoadError when it does not fit this model (a
        module the model lacks, a shape of another model, a rank above the pool's), leaving the loaded adapters as
        they were."""
        if adapter_id in self.loaded:
            raise ValueError(f"adapter id {adapter_id} is already loaded")
        if self.pooled and adapter.config.r > self.max_rank:
            raise ModelLoadError(f"the adapter at {adapter.path} has rank {adapter.config.r}, above the "
                                 f"{self.max_rank} this model's adapter slots were sized for; start with "
                                 f"--max-lora-rank {adapter.config.r} (or more)")
        model = self.model
        device, dtype = model.embed.weight.device, model.embed.weight.dtype  # the activations'
        names = [f"{path}.weight" for path in adapter.weights]
        targets = targets_of(names, model.config, model)
        missing = sorted(set(adapter.weights) - set(targets))
        if missing:
            raise ModelLoadError(f"the adapter at {adapter.path} adapts {missing[0]!r}, which this model does not "
                                 f"have ({len(missing)} such modules); it was trained on a different model")
        by_module: dict[str, list] = {}
        for target in targets.values():
            by_module.setdefault(target.module, []).append(target)
        built: dict[str, _Weights] = {}
        for module, group in by_module.items():
            linear = model.get_submodule(module)
            base = linear.base if isinstance(linear, AdapterLinear) else linear
            holder = LoraLinear(base, group, adapter.config.r, adapter.config.scale, 0.0)
            for target in group:
                a, b = adapter.weights[target.path]
                holder.set(target.path, a.float(), b.float())  # a wrong rank or shape raises ModelLoadError
            a, b = holder.lora_A.data, holder.block_b(torch.float32)
            if self.pooled:  # kept on the host, B transposed with the scale folded in, ready to copy into a slot
                built[module] = _Weights(_host(a, dtype, device), _host(b.t() * holder.scale, dtype, device), 1.0)
            else:
                built[module] = _Weights(a.to(device, dtype), b.to(device, dtype), holder.scale)
        for module, w in built.items():  # only now that every module fits
            self._wrapper(module).weights[adapter_id] = w
        self.loaded.add(adapter_id)
        if self.pooled and len(self._resident) < self.slots:
            self.slots_of([adapter_id])  # resident from the start while slots are free

    def remove(self, adapter_id: int) -> None:
        self.loaded.remove(adapter_id)
        self._resident.pop(adapter_id, None)  # its slot is free; what it holds is never read again
        for linear in self._linears.values():
            linear.weights.pop(adapter_id, None)

    def _wrapper(self, module: str, pool: _Pool | None = None) -> AdapterLinear:
        if module not in self._linears:
            parent_name, _, child = module.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapper = AdapterLinear(getattr(parent, child), self._batch, pool)
            setattr(parent, child, wrapper)
            self._linears[module] = wrapper
        return self._linears[module]

    def lora_ids(self, row_adapters) -> list[int]:
        """The LoRA adapters among these rows' adapters (a P-Tuning prefix or the base is not one), in order."""
        return list(dict.fromkeys(a for a in row_adapters if a in self.loaded))

    def slots_of(self, row_adapters: list[int | None]) -> list[int] | None:
        """Pooled: the slot of each row's adapter (-1: none), making them resident first; at most `slots`
        distinct LoRAs. None when no row has a LoRA."""
        wanted = self.lora_ids(row_adapters)
        if not wanted:
            return None
        if len(wanted) > self.slots:
            raise ValueError(f"{len(wanted)} adapters in one pass, more than the {self.slots} slots")
        for adapter_id in wanted:
            if adapter_id in self._resident:
                self._resident.move_to_end(adapter_id)
                continue
            taken = set(self._resident.values())
            free = [s for s in range(self.slots) if s not in taken]
            if free:
                slot = free[0]
            else:  # the least recently used one this pass does not need
                victim = next(a for a in self._resident if a not in wanted)
                slot = self._resident.pop(victim)
            self._copy_in(adapter_id, slot)
            self._resident[adapter_id] = slot
        return [self._resident[a] if a in self._resident else -1 for a in row_adapters]

    def _copy_in(self, adapter_id: int, slot: int) -> None:
        for linear in self._linears.values():
            p, w = linear.pool, linear.weights.get(adapter_id)
            rank = 0 if w is None else w.a.shape[0]
            if rank:
                p.a[slot, :rank].copy_(w.a, non_blocking=True)
                p.b[slot, :rank].copy_(w.b, non_blocking=True)
            p.a[slot, rank:].zero_()
            p.b[slot, rank:].zero_()

    @contextmanager
    def batch(self, row_adapters: list[int | None], device):
        """For one forward pass: the adapter of each token row (None: the base model)."""
        if self.pooled:
            slots = self.slots_of(row_adapters)
            if slots is not None:
                from ..kernels.lora import lora_rows

                self._batch.rows = lora_rows(slots, self.slots, device)
        else:
            present = self.lora_ids(row_adapters)  # LoRAs (a prefix is not here)
            if len(present) == 1 and all(a in present for a in row_adapters):
                self._batch.groups = [(present[0], None)]
            else:
                self._batch.groups = [
                    (a, torch.tensor([i for i, r in enumerate(row_adapters) if r == a], dtype=torch.long,
                                     device=device))
                    for a in present]
        try:
            yield
        finally:
            self._batch.groups, self._batch.rows = [], None

    @contextmanager
    def rows(self, rows):
        """Pooled, for a CUDA graph's capture: every pass reads the rows' slots from these tensors (LoraRows)."""
        self._batch.rows = rows
        try:
            yield
        finally:
            self._batch.rows = None
