"""Checkpoint directory -> (ModelConfig, DecoderModel with weights): safetensors (single or sharded with an
index) and PyTorch `.bin` shards, in the ChatGLM, GLM -hf, Llama and Qwen2 layouts.

Knows file layouts and name mappings; knows nothing of tokenizers, chat formats or generation.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ModelLoadError
from . import awq_gptq, glm, llama
from .cpu_int8 import use_int8_activations
from .config import ModelConfig
from .layers import DecoderModel
from .quant import QuantPlan, is_quantized_weight, prepare_model, quantize, replace_linears

FAMILIES = {
    # model_type: (config reader, name map, names to skip)
    "chatglm": (glm.config_from_chatglm, glm._CHATGLM_NAMES, glm._CHATGLM_SKIP),
    "glm": (glm.config_from_glm_hf, glm._GLM_HF_NAMES, glm._GLM_HF_SKIP),
    "llama": (llama.config_from_llama, llama._LLAMA_NAMES, llama._LLAMA_SKIP),
    "qwen2": (llama.config_from_llama, llama._LLAMA_NAMES, llama._LLAMA_SKIP),
}
_PART_ORDER = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1}
# A ChatGLM P-Tuning v2 checkpoint is the base model plus a learned prefix (config.json's pre_seq_len, the
# transformer.prefix_encoder tensors). Loaded as a plain model it would answer without its fine-tuning, silently.
_PREFIX_ENCODER = "transformer.prefix_encoder."
_NO_ADAPTERS = ("that is an adapter, not a model: load the base model's directory and serve this one beside it "
                "with --adapter NAME=DIR (LLM(..., adapters={NAME: DIR}))")


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
    if raw.get("pre_seq_len") is not None:  # the official base configs carry it as null
        raise ModelLoadError(f"{path}: pre_seq_len={raw['pre_seq_len']!r} marks a ChatGLM P-Tuning v2 checkpoint; "
                             + _NO_ADAPTERS)
    if not raw.get("quantization_config") and not raw.get("quantization_bit"):
        side = awq_gptq.side_config(model_dir)
        if side is not None:
            raw["quantization_config"] = side
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
            yield from _read_safetensors(path)
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
    except ModelLoadError:
        raise
    except Exception as e:  # truncated or corrupt file: safetensors / zipfile / pickle errors
        raise ModelLoadError(f"cannot read weights from {path} ({type(e).__name__}: {e}); the file is probably "
                             "truncated or corrupt: copy it again and compare its size with the original")


_SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                       "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A safetensors file's tensors in file order, each read into memory of its own (os.pread). Not through a
    memory map: the pages of a mapped file count towards the process's RSS for as long as the file is open, so
    loading a 12 GB checkpoint onto a GPU showed 13.75 GB of RSS; read this way the process holds one tensor."""
    with open(path, "rb") as f:
        fd = f.fileno()
        (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, size, 8))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            data = bytearray(end - begin)
            if end > begin and os.preadv(fd, [data], 8 + size + begin) != end - begin:
                raise EOFError(f"tensor {name} ends past the end of the file")  # reported as truncated, below
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ModelLoadError(f"{path}: tensor {name} has dtype {info['dtype']}, which glmkit cannot load")
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(info["shape"])


def _tensor_names(path: Path) -> list[str]:
    """The tensor names of one weights file without reading tensor data (a safetensors header; a .bin's pickle,
    memory-mapped). [] if the file cannot be read: reading its tensors reports that, with the fix."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True))
    except Exception:
        return []


def _refuse_adapter_weights(paths: list[Path]) -> None:
    """A P-Tuning v2 prefix among the weights (with pre_seq_len missing from config.json) is refused before any
    tensor is read."""
    for path in paths:
        prefix = next((name for name in _tensor_names(path) if name.startswith(_PREFIX_ENCODER)), None)
        if prefix is not None:
            raise ModelLoadError(f"{path}: tensor {prefix!r} is a ChatGLM P-Tuning v2 prefix encoder; " + _NO_ADAPTERS)


def _map_name(name: str, names, skip) -> str | None:
    if skip.fullmatch(name):
        return None
    for pattern, target in names:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint; is model_type in config.json right?")


def _tensor_count(paths: list[Path]) -> int | None:
    """For the progress bar: the number of tensors, where the headers tell it (else None; errors come later)."""
    from safetensors import safe_open

    try:
        return sum(len(safe_open(str(p), framework="pt").keys()) for p in paths)
    except Exception:
        return None


def _store(state: dict, target: str, tensor: torch.Tensor, dtype: torch.dtype, plan: QuantPlan | None,
           device: torch.device | None = None) -> None:
    """Put one finished tensor into the state dict: quantized on `device` (fast on a GPU) if the plan says so, else
    in the model dtype."""
    if plan is not None and is_quantized_weight(target):
        base = target.removesuffix(".weight")
        bits = plan.bits_for(base)
        if bits and plan.source == "fresh":
            state[base + ".qweight"], state[base + ".scales"] = quantize(bits, tensor.to(device), plan.group_size)
            return
        if bits and plan.source == "chatglm":  # already int8 / packed int4, next to a `weight_scale`
            state[base + ".qweight"] = tensor
            return
    if target.endswith(".scales"):
        state[target] = tensor.float()
    elif plan is None:  # a float model goes onto the device tensor by tensor: the host never holds all of it
        state[target] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
    else:  # quantizing: the few float tensors wait on the host, so that they do not add to the GPU's peak
        state[target] = tensor.to(dtype) if tensor.is_floating_point() else tensor


def _place_int4(state: dict, parts: dict, target: str | None, weight: "awq_gptq.Int4Weight") -> None:
    """A converted AWQ/GPTQ linear: into `parts` if it is fused with others (q/k/v, gate/up), else stored."""
    if target is None:
        return
    if "#" in target:
        key, part = target.split("#")
        parts.setdefault(key, {})[part] = weight
    else:
        awq_gptq.store(state, target, weight)


def _fold(name: str, tensor: torch.Tensor, deltas: dict[str, torch.Tensor], model_dir: Path) -> torch.Tensor:
    """A checkpoint weight plus an adapter's update (scale * B @ A) for it, in fp32 (cast when stored)."""
    delta = deltas.pop(name)
    if delta.shape != tensor.shape:
        raise ModelLoadError(f"the adapter's update for {name.removesuffix('.weight')!r} has shape "
                             f"{tuple(delta.shape)} but {model_dir}'s weight is {tuple(tensor.shape)}; the adapter "
                             "was trained on a different model")
    return tensor.float() + delta


def load_state_dict(model_dir: Path, model_type: str, dtype: torch.dtype, plan: QuantPlan | None = None,
                    device: torch.device | None = None,
                    deltas: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under internal names, fused, converted to `dtype`, quantized as `plan` says.
    `deltas` (an adapter's updates by checkpoint tensor name) are added to their weights first, so a LoRA is
    folded in before fusing and quantizing."""
    from tqdm import tqdm

    deltas = dict(deltas or {})
    if deltas and plan is not None and plan.source != "fresh":
        raise ModelLoadError(f"{model_dir} is already quantized ({plan.mode}): an adapter cannot be folded into "
                             "its weights; load the float checkpoint with --quantization instead")

    _, names, skip = FAMILIES[model_type]
    if plan is not None and plan.source == "glmkit":  # saved by glmkit: internal names already
        names, skip = [(r"(.*)", r"\1")], re.compile(r"$^")
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    paths = _weight_files(model_dir)
    _refuse_adapter_weights(paths)
    fresh = plan is not None and plan.source == "fresh"
    packed = awq_gptq.PackedLayers(plan, device) if plan is not None and plan.source in ("awq", "gptq") else None
    progress = tqdm(total=_tensor_count(paths) if fresh else None, desc=f"quantizing to {plan.mode}" if fresh
                    else "loading", unit="tensor", disable=not fresh)
    for path in paths:
        for name, tensor in _read_tensors(path):
            progress.update()
            if name.endswith(".weight_scale") and plan is not None:  # ChatGLM's quantized checkpoints: a scale per row
                target = _map_name(name.removesuffix("_scale"), names, skip)
                scales = tensor.float()
                state[target.removesuffix(".weight") + ".scales"] = scales[:, None] if plan.bits == 4 else scales
                continue
            if packed is not None:
                layers = packed.take(name, tensor)
                if layers is not None:
                    for module, weight in layers:
                        _place_int4(state, parts, _map_name(module + ".weight", names, skip), weight)
                    continue
            elif (plan is None or plan.source == "fresh") and name.endswith((".qweight", ".qzeros")):
                raise ModelLoadError(f"{path}: tensor {name!r} is part of an AWQ/GPTQ 4-bit layer, but config.json "
                                     "has no quantization_config saying so; load the model with its release's "
                                     "config.json and without --quantization (it is already quantized)")
            target = _map_name(name, names, skip)
            if target is None:
                continue
            if name in deltas:
                tensor = _fold(name, tensor, deltas, model_dir)
            if "#" in target:
                key, part = target.split("#")
                parts.setdefault(key, {})[part] = tensor
            else:
                _store(state, target, tensor, dtype, plan, device)
    if packed is not None:
        for module, weight in packed.finish():
            _place_int4(state, parts, _map_name(module + ".weight", names, skip), weight)
    for key, pieces in parts.items():  # fuse q/k/v and gate/up in the internal row order
        ordered = [pieces[p] for p in sorted(pieces, key=_PART_ORDER.__getitem__)]
        kinds = {isinstance(p, awq_gptq.Int4Weight) for p in ordered}
        if len(kinds) > 1:
            raise ModelLoadError(f"{model_dir}: the linears that make up {key.removesuffix('.weight')} are partly "
                                 "quantized and partly float (modules_to_not_convert?); glmkit runs them as one fused "
                                 "layer, so they must all be quantized or all float")
        if kinds == {True}:
            awq_gptq.store(state, key, awq_gptq.fuse(key, ordered))
        else:
            _store(state, key, torch.cat(ordered), dtype, plan, device)
    progress.close()
    if deltas:
        raise ModelLoadError(f"the adapter adapts {sorted(deltas)[0].removesuffix('.weight')!r}, which {model_dir} "
                             f"does not have ({len(deltas)} such modules); the adapter was trained on a different "
                             "model")
    return state


def settle_head(state: dict, config: ModelConfig, dtype: torch.dtype, plan: QuantPlan | None,
                device: torch.device | None = None) -> None:
    """Tie the output layer to the embedding, or give it a (quantized) tensor of its own."""
    if plan is not None and plan.head_bits:  # a quantized head of its own, copied from a tied embedding
        if "lm_head.qweight" not in state:
            _store(state, "lm_head.weight", state["embed.weight"], dtype, plan, device)
        config.tie_word_embeddings = False
    elif config.tie_word_embeddings or "lm_head.weight" not in state:
        config.tie_word_embeddings = True
        state.pop("lm_head.weight", None)


def load_model(model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
               plan: QuantPlan | None = None, deltas: dict[str, torch.Tensor] | None = None,
               pack: bool = True) -> DecoderModel:
    """`pack=False` keeps quantized weights in the portable layout (what training dequantizes per layer)
    instead of packing them for the inference kernels."""
    state = load_state_dict(model_dir, config.model_type, dtype, plan, device, deltas)
    settle_head(state, config, dtype, plan, device)
    with torch.device("meta"):
        model = DecoderModel(config)
        if plan is not None:
            replace_linears(model, plan, state)
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(f"{model_dir}: checkpoint does not match config.json: missing "
                             f"{sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
    shapes = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, tensor in state.items():
        want = shapes[key].shape
        if tensor.shape != want:
            raise ModelLoadError(f"{model_dir}: tensor {key} has shape {tuple(tensor.shape)} but config.json "
                                 f"implies {tuple(want)}; the config and weights are from different models")
    model.load_state_dict(state, assign=True, strict=False)
    state.clear()  # the model holds the tensors now; packing them below must be able to free each old layout
    if config.tie_word_embeddings:  # before the move: the head has no tensor of its own yet
        model.lm_head.weight = model.embed.weight
    model = model.to(device).eval()
    if plan is not None and pack:
        prepare_model(model, dtype, int8_activations=plan.int8_activations)
        if plan.int8_activations and device.type == "cpu":  # int8a8 on a CPU: W8A8 products of cpu_int8.py
            # After packing, from the scales rounded to the activations' dtype: what the README's perplexity
            # figure measured (+0.46% against fp32; from fp32 scales +0.76%, within the text's noise).
            use_int8_activations(model)
    model.finish_loading()  # after the move: the rotary tables are built on the model's device
    return model
