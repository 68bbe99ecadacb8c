"""`glmkit finetune --config FILE`: settings from YAML, either ChatGLM3 finetune_demo's own `configs/lora.yaml`
(data_config, max_input_length + max_output_length, training_args as transformers' Seq2SeqTrainingArguments,
peft_config) or glmkit's flag names (`learning_rate: 1e-4`, `lora_r: 16`, `data: train.jsonl` ...).

Returns flag values by argparse destination; the command fills only the flags not given on the command line.
Relative data paths are tried from the config file's folder first (the demo keeps its data beside its
configs), then from the working directory; the output directory is relative to the working directory, as in the
demo. Settings with no glmkit meaning (dataloader
workers, logging strategy, ...) are listed once, not refused. Knows nothing of torch or training.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InvalidParameterError

log = logging.getLogger("glmkit")

# training_args (transformers' names) -> flag destinations
_TRAINING_ARGS = {"output_dir": "output", "max_steps": "max_steps", "num_train_epochs": "epochs",
                  "learning_rate": "learning_rate", "seed": "seed", "save_steps": "save_every",
                  "eval_steps": "eval_every", "warmup_ratio": "warmup_ratio", "lr_scheduler_type": "schedule"}
_PEFT = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
         "target_modules": "target_modules"}
_IGNORED_PEFT = {"peft_type", "task_type", "inference_mode", "bias"}
_FLAGS = {"method", "pre_seq_len", "data", "eval", "output", "epochs", "max_steps", "learning_rate", "batch_size",
          "micro_batch_size",
          "max_length", "schedule", "warmup_ratio", "seed", "save_every", "eval_every", "recompute", "lora_r",
          "lora_alpha", "lora_dropout", "target_modules"}


def _path(value, base: Path) -> str:
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and (base / path).exists():
        return str(base / path)
    return str(path)


def _number(value, field: str, kind):
    try:
        # YAML reads 5e-5 as a string (PyYAML follows YAML 1.1's float syntax); epochs may be written 3.0
        return int(float(value)) if kind is int else float(value)
    except (TypeError, ValueError):
        raise InvalidParameterError(field, value, f"must be a {'whole number' if kind is int else 'number'}")


def _demo(raw: dict, base: Path, path: Path) -> tuple[dict, list[str]]:
    out, ignored = {}, []
    data = raw.get("data_config") or {}
    if data.get("train_file"):
        out["data"] = _path(data["train_file"], base)
    if data.get("val_file"):
        out["eval"] = _path(data["val_file"], base)
    if raw.get("max_input_length") or raw.get("max_output_length"):
        out["max_length"] = _number(raw.get("max_input_length", 0), "max_input_length", int) + \
            _number(raw.get("max_output_length", 0), "max_output_length", int)
    training = raw.get("training_args") or {}
    for key, value in training.items():
        if key in _TRAINING_ARGS:
            out[_TRAINING_ARGS[key]] = value
        elif key not in ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing"):
            ignored.append(f"training_args.{key}")
    per_device = _number(training.get("per_device_train_batch_size", 1), "per_device_train_batch_size", int)
    if "per_device_train_batch_size" in training:
        accumulate = _number(training.get("gradient_accumulation_steps", 1), "gradient_accumulation_steps", int)
        out["batch_size"], out["micro_batch_size"] = per_device * accumulate, per_device
    if "gradient_checkpointing" in training:
        out["recompute"] = "on" if training["gradient_checkpointing"] else "off"
    peft = raw.get("peft_config") or {}
    peft_type = str(peft.get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "PREFIX_TUNING"):
        raise InvalidParameterError(f"{path.name}: peft_config.peft_type", peft.get("peft_type"),
                                    "must be LORA or PREFIX_TUNING (P-Tuning v2), as the demo's configs")
    if peft_type == "PREFIX_TUNING":
        out["method"] = "ptuning"
    for key, value in peft.items():
        if key == "num_virtual_tokens":
            out["pre_seq_len"] = value
        elif key in _PEFT:
            out[_PEFT[key]] = ",".join(value) if isinstance(value, list) else value
        elif key not in _IGNORED_PEFT:
            ignored.append(f"peft_config.{key}")
    ignored += [k for k in raw if k not in ("data_config", "max_input_length", "max_output_length", "training_args",
                                            "peft_config")]
    return out, ignored


def read_config(file: str | Path) -> dict:
    """The YAML file's settings as {flag destination: value}, numbers converted, paths resolved."""
    import yaml

    path = Path(file).expanduser()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InvalidParameterError("--config", str(path), f"is not valid YAML ({' '.join(str(e).split())})")
    if not isinstance(raw, dict):
        raise InvalidParameterError("--config", str(path), "must hold a mapping of settings")
    base = path.parent
    if {"data_config", "training_args", "peft_config"} & raw.keys():
        out, ignored = _demo(raw, base, path)
    else:
        out, ignored = {}, []
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name in _FLAGS:
                out[name] = _path(value, base) if name in ("data", "eval") else value
            else:
                ignored.append(key)
    for name, kind in (("learning_rate", float), ("lora_alpha", float), ("lora_dropout", float),
                       ("warmup_ratio", float), ("epochs", int), ("max_steps", int), ("lora_r", int),
                       ("batch_size", int), ("micro_batch_size", int), ("max_length", int), ("seed", int),
                       ("save_every", int), ("eval_every", int), ("pre_seq_len", int)):
        if out.get(name) is not None:
            out[name] = _number(out[name], f"{path.name}: {name}", kind)
    if out.get("max_steps") is not None and out["max_steps"] <= 0:
        out.pop("max_steps")  # transformers' -1: train by epochs
    if ignored:
        log.info("glmkit: %s: settings with no meaning here, ignored: %s", path.name, ", ".join(ignored))
    return out
