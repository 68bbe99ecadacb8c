"""Checkpoint directory -> (ModelConfig, DecoderModel with weights): safetensors (single or sharded with an
index) and PyTorch `.bin` shards, in the ChatGLM, GLM -hf, Llama and Qwen2 layouts.

Knows file layouts and name mappings; knows nothing of tokenizers, chat formats or generation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ModelLoadError
from . import glm, llama
from .config import ModelConfig
from .layers import DecoderModel

FAMILIES = {
    # model_type: (config reader, name map, names to skip)
    "chatglm": (glm.config_from_chatglm, glm._CHATGLM_NAMES, glm._CHATGLM_SKIP),
    "glm": (glm.config_from_glm_hf, glm._GLM_HF_NAMES, glm._GLM_HF_SKIP),
    "llama": (llama.config_from_llama, llama._LLAMA_NAMES, llama._LLAMA_SKIP),
    "qwen2": (llama.config_from_llama, llama._LLAMA_NAMES, llama._LLAMA_SKIP),
}
_PART_ORDER = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}


def read_config(model_dir: Path) -> tuple[dict, ModelConfig]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json; pass a model directory as saved by its authors "
                             "(config.json, weights, tokenizer files) or a .gguf file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); re-copy the file from the model's release")
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ModelLoadError(f"{path}: model_type={model_type!r} is not supported; supported model types: "
                             f"{', '.join(sorted(FAMILIES))}")
    try:
        return raw, FAMILIES[model_type][0](raw)
    except KeyError as e:
        raise ModelLoadError(f"{path}: required key {e.args[0]!r} is missing for model_type={model_type!r}")


def _weight_files(model_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = model_dir / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (model_dir / n).is_file()]
            if missing:
                raise ModelLoadError(f"{index} lists shards that are missing: {', '.join(missing)}; "
                                     "download or copy every shard into the directory")
            return [model_dir / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise ModelLoadError(f"{model_dir} has no weights: expected model.safetensors, "
                         "model.safetensors.index.json + shards, pytorch_model.bin or pytorch_model.bin.index.json")


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
    except ModelLoadError:
        raise
    except Exception as e:  # truncated or corrupt file: safetensors / zipfile / pickle errors
        raise ModelLoadError(f"cannot read weights from {path} ({type(e).__name__}: {e}); the file is probably "
                             "truncated or corrupt: copy it again and compare its size with the original")


def _map_name(name: str, names, skip) -> str | None:
    if skip.fullmatch(name):
        return None
    for pattern, target in names:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint; is model_type in config.json right?")


def load_state_dict(model_dir: Path, model_type: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    _, names, skip = FAMILIES[model_type]
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path in _weight_files(model_dir):
        for name, tensor in _read_tensors(path):
            target = _map_name(name, names, skip)
            if target is None:
                continue
            tensor = tensor.to(dtype)
            if "#" in target:
                key, part = target.split("#")
                parts.setdefault(key, {})[part] = tensor
            else:
                state[target] = tensor
    for key, pieces in parts.items():  # fuse q/k/v and gate/up in the internal row order
        state[key] = torch.cat([pieces[p] for p in sorted(pieces, key=_PART_ORDER.__getitem__)])
    return state


def load_model(model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> DecoderModel:
    state = load_state_dict(model_dir, config.model_type, dtype)
    if config.tie_word_embeddings or "lm_head.weight" not in state:
        config.tie_word_embeddings = True
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = DecoderModel(config)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(f"{model_dir}: checkpoint does not match config.json: missing "
                             f"{sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
    for key, tensor in state.items():
        want = model.get_parameter(key).shape
        if tensor.shape != want:
            raise ModelLoadError(f"{model_dir}: tensor {key} has shape {tuple(tensor.shape)} but config.json "
                                 f"implies {tuple(want)}; the config and weights are from different models")
    model.load_state_dict(state, assign=True, strict=False)
    if config.tie_word_embeddings:  # before the move: the head has no tensor of its own yet
        model.lm_head.weight = model.embed.weight
    model = model.to(device).eval()
    model.finish_loading()  # after the move: the rotary tables are built on the model's device
    return model
