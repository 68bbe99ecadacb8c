"""AutoAWQ and AutoGPTQ 4-bit checkpoints -> glmkit's portable int4 layout (models/quant.py), layer by layer.

Both formats store unsigned 4-bit values u in 0..15 with a zero point z and a scale s per group of input columns:
w = (u - z) * s = (u - 8) * s + (8 - z) * s. So each layer maps exactly onto q = u - 8 (glmkit's signed nibbles)
plus the per-group `offsets` (8 - z) * s, and runs on glmkit's own int4 kernels. Where every zero is 8
(GPTQ sym=true) no offsets are kept.

Layouts read (in -> out is nn.Linear's in_features -> out_features; eight nibbles per int32, lowest bits first):
  AWQ "gemm" (AutoAWQ): `qweight` int32 [in, out/8] and `qzeros` int32 [in/group, out/8], each int32 holding 8
      output columns in the order 0, 2, 4, 6, 1, 3, 5, 7 (nibble i is column ORDER[i]); `scales` fp16 [groups, out].
  GPTQ (AutoGPTQ, Optimum, GPTQModel): `qweight` int32 [in/8, out] packed along the input (nibble i of row r is
      input 8r + i); `qzeros` int32 [groups, out/8] in plain order; `scales` [groups, out]; `g_idx` int32 [in],
      the group of each input column. Format "gptq" (v1) stores z - 1 in qzeros, "gptq_v2" stores z.
  Act-order (desc_act) checkpoints have a g_idx whose groups are not contiguous: the layer's columns are permuted
  so they are (and the layer gathers x's columns in the same order at run time, QuantLinear.perm).

Knows these two formats and the portable layout; knows nothing of model families or file names (loader.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .quant import QuantPlan, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds output column AWQ_ORDER[i] of its 8
PIECES = ("qweight", "qzeros", "scales", "g_idx")
_NEEDED = ("qweight", "qzeros", "scales")
# Older AutoGPTQ and AutoAWQ releases keep their settings beside config.json rather than in it.
_SIDE_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


@dataclass
class Int4Weight:
    """One linear in the portable int4 layout: q in [-8, 7] packed two per byte, w = q * scale + offset."""
    qweight: torch.Tensor           # int8 [out, in/2]
    scales: torch.Tensor            # fp32 [out, groups]
    offsets: torch.Tensor | None    # fp32 [out, groups]; None where every zero point is 8
    perm: torch.Tensor | None       # int64 [in]: act-order's column order; None where groups are contiguous


def side_config(model_dir: Path) -> dict | None:
    """The quantization_config of a release that keeps it in quantize_config.json (AutoGPTQ) or quant_config.json
    (AutoAWQ) instead of config.json; None if it has neither."""
    for name, method in _SIDE_CONFIGS.items():
        path = model_dir / name
        if path.is_file():
            try:
                return {"quant_method": method} | json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{path} is not valid JSON ({e}); re-copy the file from the model's release")
    return None


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n] -> int8 [..., n, 8]: nibble i (bits 4i..4i+3) of each int32, as 0..15."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).to(torch.int8)


def _columns(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [rows, cols/8] packed along the columns -> int8 [rows, cols]."""
    u = _nibbles(packed)  # [rows, cols/8, 8]
    if order is not None:  # u[..., i] is column order[i]: put column j at j
        u = u[..., [order.index(j) for j in range(8)]]
    return u.flatten(1)


def _portable(u: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, perm: torch.Tensor | None) -> Int4Weight:
    """u [in, out] (0..15, in the layer's column order), zeros and scales [groups, out] -> the portable layout."""
    scales = scales.float()
    offsets = None if bool((zeros == 8).all()) else ((8 - zeros.float()) * scales).t().contiguous()
    q = (u - 8).t().contiguous()  # [out, in]
    return Int4Weight(pack_int4(q), scales.t().contiguous(), offsets, perm)


def _group_size(name: str, in_features: int, groups: int, plan: QuantPlan) -> int:
    expected = plan.group_size or in_features
    if in_features % expected or groups != in_features // expected:
        raise ModelLoadError(f"{name}.scales has {groups} groups for {in_features} input columns and "
                             f"quantization_config.group_size={plan.group_size or -1}; glmkit needs the input split "
                             "into whole groups of that size (a partial last group cannot run on its kernels, and a "
                             "count that disagrees means config.json is from another release): use a release with "
                             "another group size, or the float checkpoint with --quantization int4")
    return expected


def from_awq(name: str, pieces: dict[str, torch.Tensor], plan: QuantPlan) -> Int4Weight:
    u = _columns(pieces["qweight"], AWQ_ORDER)  # [in, out]
    zeros = _columns(pieces["qzeros"], AWQ_ORDER)  # [groups, out]
    _group_size(name, u.shape[0], pieces["scales"].shape[0], plan)
    return _portable(u, zeros, pieces["scales"], None)


def from_gptq(name: str, pieces: dict[str, torch.Tensor], plan: QuantPlan) -> Int4Weight:
    packed = pieces["qweight"]  # [in/8, out]
    u = _nibbles(packed.t()).flatten(1).t()  # [in, out]: input 8r + i from nibble i of row r
    scales = pieces["scales"]
    in_features, groups = u.shape[0], scales.shape[0]
    group = _group_size(name, in_features, groups, plan)
    zeros = _columns(pieces["qzeros"]).to(torch.int16)
    if plan.checkpoint_format == "gptq":  # v1 stores z - 1 (and AutoGPTQ adds the 1 back without masking)
        zeros = zeros + 1
    perm = None
    g_idx = pieces.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.long()
        if not torch.equal(g_idx, torch.arange(in_features, device=g_idx.device) // group):
            perm = _act_order(name, g_idx, groups, group)
            u = u[perm]
    return _portable(u, zeros, scales, perm)


def _act_order(name: str, g_idx: torch.Tensor, groups: int, group: int) -> torch.Tensor:
    """The column order that makes each group contiguous (stable: columns keep their order within a group)."""
    counts = torch.bincount(g_idx.clamp(0, groups), minlength=groups + 1)
    if g_idx.min() < 0 or g_idx.max() >= groups or not bool((counts[:groups] == group).all()):
        raise ModelLoadError(f"{name}.g_idx does not give each of the {groups} groups {group} input columns; "
                             "the checkpoint is damaged or not in the GPTQ layout: download it again")
    return torch.argsort(g_idx, stable=True)


class PackedLayers:
    """Collects the pieces of each quantized linear as they are read (in any order, across shards) and converts
    a layer once it is complete, so no more than a layer's packed tensors wait at a time."""

    def __init__(self, plan: QuantPlan, device: torch.device | None = None):
        self.plan, self.device = plan, device
        self.convert = from_awq if plan.source == "awq" else from_gptq
        self.complete = _NEEDED + (("g_idx",) if plan.source == "gptq" else ())
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def take(self, name: str, tensor: torch.Tensor) -> list[tuple[str, Int4Weight]] | None:
        """None if `name` is not a piece of a quantized linear; else the layers it completes (module name, weight)."""
        module, _, piece = name.rpartition(".")
        if piece not in PIECES:
            return None
        pieces = self.pending.setdefault(module, {})
        pieces[piece] = tensor.to(self.device) if self.device is not None else tensor
        if all(p in pieces for p in self.complete):
            return [(module, self.convert(module, self.pending.pop(module), self.plan))]
        return []

    def finish(self) -> list[tuple[str, Int4Weight]]:
        """The layers still waiting at the end (GPTQ checkpoints without g_idx), or the piece one lacks."""
        done = []
        for module, pieces in self.pending.items():
            missing = [p for p in _NEEDED if p not in pieces]
            if missing:
                raise ModelLoadError(f"the checkpoint has {module}.{next(iter(pieces))} but no {module}.{missing[0]}; "
                                     "a shard is missing or damaged: download the model again")
            done.append((module, self.convert(module, pieces, self.plan)))
        self.pending.clear()
        return done


def fuse(key: str, parts: list[Int4Weight]) -> Int4Weight:
    """Several linears of one input (q/k/v, gate/up) as one, their output rows stacked in order."""
    perms = [p.perm for p in parts]
    if any(p is None for p in perms) != all(p is None for p in perms) or \
            any(p is not None and not torch.equal(p, perms[0]) for p in perms):
        raise ModelLoadError(f"the linears that glmkit fuses into {key.removesuffix('.weight')} have different "
                             "act-order column orders (g_idx), which one fused layer cannot run; use a release "
                             "quantized without desc_act, or the float checkpoint with --quantization int4")
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = torch.cat([torch.zeros_like(p.scales) if p.offsets is None else p.offsets for p in parts])
    return Int4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), offsets, perms[0])


def store(state: dict, target: str, weight: Int4Weight) -> None:
    """Put a converted linear (internal name `...weight`) into the state dict as QuantLinear's buffers."""
    base = target.removesuffix(".weight")
    state[base + ".qweight"], state[base + ".scales"] = weight.qweight, weight.scales
    if weight.offsets is not None:
        state[base + ".offsets"] = weight.offsets
    if weight.perm is not None:
        state[base + ".perm"] = weight.perm
