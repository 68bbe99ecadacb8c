"""Save a quantized copy of a checkpoint, so that a big model is quantized once and then loads directly.

The copy is a model directory like any other: config.json (the original keys plus a `quantization_config`
with quant_method "glmkit"), one `model.safetensors` in glmkit's internal tensor names, and every other file
of the source directory (tokenizer, chat template, licence) copied unchanged.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from ..errors import InvalidParameterError
from .gguf import build_once, quantized_copy_dir, steps
from .loader import load_state_dict, read_config, settle_head
from .quant import QuantPlan

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def copy_other_files(model_dir: Path, out_dir: Path, keep_config: bool) -> None:
    """Copy everything of a model directory but its weights (tokenizer, chat template, licence; config.json too
    with `keep_config`) to a new model directory."""
    for src in model_dir.iterdir():
        if src.is_file() and not src.name.startswith(".") and not src.name.endswith(_WEIGHT_SUFFIXES) \
                and not src.name.endswith(".index.json") and (keep_config or src.name != "config.json"):
            shutil.copy2(src, out_dir / src.name)


def save_quantized(model_dir: Path, plan: QuantPlan, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Quantize `model_dir` as `plan` says and write the copy to `out_dir` (which must not hold a model)."""
    from safetensors.torch import save_file

    if out_dir.resolve() == model_dir.resolve():
        raise InvalidParameterError("output", str(out_dir), "must differ from the source model directory")
    if (out_dir / "config.json").exists():
        raise InvalidParameterError("output", str(out_dir), "already holds a model; choose a new directory")
    raw, config = read_config(model_dir)
    state = load_state_dict(model_dir, config.model_type, dtype, plan)
    settle_head(state, config, dtype, plan)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_other_files(model_dir, out_dir, keep_config=False)
    saved = replace(plan, source="glmkit")
    raw = {k: v for k, v in raw.items() if k != "quantization_bit"} | {
        "quantization_config": saved.to_config(), "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch.")}
    tmp = out_dir / "model.safetensors.partial"
    size = sum(t.numel() * t.element_size() for t in state.values())
    steps.info("glmkit: writing the %s weights (%.1f GB)", plan.mode, size / 1e9)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    tmp.rename(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False), encoding="utf-8")
    return out_dir


def cached_quantized_copy(model_dir: Path, plan: QuantPlan) -> Path:
    """A quantized copy beside `model_dir` (made once, atomically; reused afterwards)."""
    out = quantized_copy_dir(model_dir, plan.tag)
    return build_once(out, lambda tmp: save_quantized(model_dir, plan, tmp), "config.json")
