"""P-Tuning v2 as ChatGLM2/3 implement it: a learned prefix of `pre_seq_len` keys and values for every layer,
which every real token attends to, and the format their ptuning scripts save (what ChatGLM's own code loads).

The prefix encoder is an embedding of [pre_seq_len, num_layers * 2 * kv_groups * kv_channels] (optionally
through ChatGLM's projection: Linear(kv_size, hidden) -> tanh -> Linear(hidden, kv_size)); row p holds, for
layer l, its key at [2l] and value at [2l + 1] (each kv_groups x kv_channels). As the original: the prefix
keys are not rotated, the real tokens keep positions 0, 1, ... (the prefix takes none), every query attends to
the whole prefix, and in training dropout 0.1 is applied to the prefix. Saved as a directory with the base's
config.json plus `pre_seq_len` / `prefix_projection`, and `pytorch_model.bin` holding only the
`transformer.prefix_encoder.*` tensors. Knows nothing of optimizers or data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidParameterError, ModelLoadError

PREFIX = "transformer.prefix_encoder."
PREFIX_DROPOUT = 0.1  # the original's dropout on the prefix while training


class PrefixEncoder(nn.Module):
    def __init__(self, config, pre_seq_len: int, projection: bool = False, hidden_size: int | None = None):
        super().__init__()
        if config.model_type != "chatglm":
            raise InvalidParameterError("method", "ptuning", f"P-Tuning v2 is ChatGLM's (model_type chatglm); this "
                                        f"model is {config.model_type!r}: use --method lora")
        if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
            raise InvalidParameterError("pre_seq_len", pre_seq_len, "must be a whole number >= 1 (128 is usual)")
        self.pre_seq_len, self.projection = pre_seq_len, projection
        self.num_layers, self.groups, self.head_dim = config.num_layers, config.num_kv_heads, config.head_dim
        kv_size = config.num_layers * 2 * config.num_kv_heads * config.head_dim
        self.embedding = nn.Embedding(pre_seq_len, kv_size)
        if projection:
            hidden = hidden_size or config.hidden_size
            self.trans = nn.Sequential(nn.Linear(kv_size, hidden), nn.Tanh(), nn.Linear(hidden, kv_size))
        self.dropout = nn.Dropout(PREFIX_DROPOUT)

    def forward(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [pre_seq_len, kv_groups, kv_channels] in `dtype`."""
        kv = self.embedding.weight
        if self.projection:
            kv = self.trans(kv)
        kv = self.dropout(kv.to(dtype)).view(self.pre_seq_len, self.num_layers * 2, self.groups, self.head_dim)
        return [(kv[:, 2 * i], kv[:, 2 * i + 1]) for i in range(self.num_layers)]


def save_prefix(out_dir: Path, encoder: PrefixEncoder, base_config: dict) -> None:
    """ChatGLM's P-Tuning v2 format: config.json (the base's, with pre_seq_len and prefix_projection) and
    pytorch_model.bin with the prefix encoder's tensors only."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {PREFIX + name: t.detach().float().cpu().contiguous() for name, t in encoder.state_dict().items()}
    tmp = out_dir / "pytorch_model.bin.partial"
    torch.save(state, tmp)
    tmp.replace(out_dir / "pytorch_model.bin")
    config = dict(base_config) | {"pre_seq_len": encoder.pre_seq_len, "prefix_projection": encoder.projection}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def load_prefix(directory: Path, encoder: PrefixEncoder) -> None:
    """The prefix encoder's tensors from a saved P-Tuning v2 directory (a checkpoint of this run)."""
    state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    encoder.load_state_dict({k.removeprefix(PREFIX): v for k, v in state.items()})


@dataclass
class PrefixAdapter:
    """A prefix read for serving: per layer (keys, values) [pre_seq_len, kv_groups, kv_channels]. ChatGLM's
    P-Tuning v2 gives the real tokens rotary positions from 0; peft's prefix tuning (through transformers, which
    counts the prefix as past tokens) from pre_seq_len: `after_prefix`."""
    path: Path
    pre_seq_len: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    after_prefix: bool = False


def is_prefix_dir(directory: Path) -> bool:
    """Whether a directory looks like ChatGLM's P-Tuning v2 output (config.json with a pre_seq_len)."""
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("pre_seq_len") is not None
    except (OSError, ValueError, AttributeError):
        return False


def _prefix_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The prefix encoder's tensors of one weights file (the base model's, if it holds them too, are skipped)."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}
        loaded = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file fails as its reader pleases
        raise ModelLoadError(f"{file} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"{file} holds {type(loaded).__name__}, not a dict of tensors")
    return {k: v for k, v in loaded.items() if isinstance(k, str) and k.startswith(PREFIX)}


def read_prefix(directory: str | Path, config) -> PrefixAdapter:
    """ChatGLM's P-Tuning v2 directory (config.json with pre_seq_len and prefix_projection; the
    `transformer.prefix_encoder.*` tensors in its weights: alone, as ChatGLM2's ptuning script saves them, or
    beside the whole model's, as ChatGLM3's and GLM-4's finetune_demo save them, sharded or not) -> the
    prefix's keys and values for a model of `config`, computed once."""
    path = Path(directory).expanduser()
    if config.model_type != "chatglm":
        raise ModelLoadError(f"{path} is a ChatGLM P-Tuning v2 prefix; this model is {config.model_type!r}, which "
                             "has no prefix encoder: serve it on the ChatGLM2/3 base it was trained on")
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))  # is_prefix_dir has read it
    pre_seq_len, projection = raw.get("pre_seq_len"), bool(raw.get("prefix_projection"))
    from .loader import _weight_files

    state = {}
    for file in _weight_files(path):  # the prefix alone, or the whole model with it (sharded or not)
        state.update(_prefix_tensors(file))
    if not state:
        raise ModelLoadError(f"{path} has config.json with pre_seq_len={pre_seq_len!r} but no {PREFIX}* tensors "
                             "in its weights; pass the directory ChatGLM's P-Tuning v2 run saved")
    encoder = PrefixEncoder(config, pre_seq_len, projection, raw.get("hidden_size"))
    try:
        encoder.load_state_dict({k.removeprefix(PREFIX): v.float() for k, v in state.items()})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise ModelLoadError(f"{path}: its prefix does not fit this model ({first}); it was trained on a "
                             "different model (layers, KV heads or head size differ)") from None
    with torch.no_grad():
        kv = [(k.clone(), v.clone()) for k, v in encoder.eval()(torch.float32)]
    return PrefixAdapter(path, pre_seq_len, kv)
