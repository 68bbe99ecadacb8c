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

`read_served_adapter` reads either kind of adapter directory; a P-Tuning v2 prefix is not held here but in KV
blocks the engine pins for it (LLMEngine.add_adapter).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .lora import Adapter, LoraLinear, read_adapter, targets_of
from .ptuning import PrefixAdapter, is_prefix_dir, read_prefix


def read_served_adapter(directory, config) -> Adapter | PrefixAdapter:
    """An adapter directory as it was saved: a peft LoRA (adapter_config.json) or ChatGLM's P-Tuning v2
    (config.json with pre_seq_len), for a model of `config`."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; pass what a fine-tuning saved (glmkit finetune's "
                             "--output, peft's save_pretrained, or ChatGLM's P-Tuning v2 checkpoint)")
    if is_prefix_dir(path) and not (path / "adapter_config.json").is_file():
        return read_prefix(path, config)
    return read_adapter(path)


@dataclass
class _Weights:
    a: torch.Tensor      # [targets * r, in]
    b: torch.Tensor      # [out, targets * r], zero outside each target's rows
    scale: float


class _Batch:
    """Which rows of the current forward pass each adapter computes: (adapter id, row indices or None for all)."""

    def __init__(self):
        self.groups: list[tuple[int, torch.Tensor | None]] = []


class AdapterLinear(nn.Module):
    """A linear (float or quantized) plus, for the rows of each adapter in the batch, that adapter's update."""

    def __init__(self, base: nn.Module, batch: _Batch):
        super().__init__()
        self.base, self._batch = base, batch
        self.weights: dict[int, _Weights] = {}

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
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
    """The LoRA adapters loaded into one model, by engine id."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._batch = _Batch()
        self._linears: dict[str, AdapterLinear] = {}  # glmkit module path -> its wrapper
        self.loaded: set[int] = set()  # ids only: the weights live in the wrappers (the read copy is let go)

    def add(self, adapter_id: int, adapter: Adapter) -> None:
        """Load an adapter's weights under `adapter_id`. Raises ModelLoadError when it does not fit this model (a
        module the model lacks, a shape of another model), leaving the loaded adapters as they were."""
        if adapter_id in self.loaded:
            raise ValueError(f"adapter id {adapter_id} is already loaded")
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
            built[module] = _Weights(a.to(device, dtype), b.to(device, dtype), holder.scale)
        for module, w in built.items():  # only now that every module fits
            self._wrapper(module).weights[adapter_id] = w
        self.loaded.add(adapter_id)

    def remove(self, adapter_id: int) -> None:
        self.loaded.remove(adapter_id)
        for linear in self._linears.values():
            linear.weights.pop(adapter_id, None)

    def _wrapper(self, module: str) -> AdapterLinear:
        if module not in self._linears:
            parent_name, _, child = module.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapper = AdapterLinear(getattr(parent, child), self._batch)
            setattr(parent, child, wrapper)
            self._linears[module] = wrapper
        return self._linears[module]

    @contextmanager
    def batch(self, row_adapters: list[int | None], device):
        """For one forward pass: the adapter of each token row (None: the base model)."""
        present = dict.fromkeys(a for a in row_adapters if a in self.loaded)  # LoRAs (a prefix is not here)
        if len(present) == 1 and all(a in present for a in row_adapters):
            self._batch.groups = [(next(iter(present)), None)]
        else:
            self._batch.groups = [
                (a, torch.tensor([i for i, r in enumerate(row_adapters) if r == a], dtype=torch.long, device=device))
                for a in present]
        try:
            yield
        finally:
            self._batch.groups = []
