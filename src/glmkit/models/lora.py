"""LoRA on glmkit's decoder, and LoRA adapters in peft's format (what transformers + peft save and load).

glmkit fuses projections (`attn.qkv` = [q | k | v], `mlp.gate_up` = [gate | up]); checkpoints name them as
their authors did: ChatGLM's `query_key_value` and `dense_h_to_4h` are fused too, Llama/Qwen's `q_proj`,
`gate_proj`... are not. A LoRA target is a module of the *checkpoint*, found through the loader's own name map
(so a peft adapter made for the original model loads unchanged): it wraps the fused linear it lands in and
adds its low-rank update to that module's rows only (a `part`). Saved adapters use the checkpoint's module
names, so transformers + peft load them onto the original model.

Two uses: training (`add_lora`: LoraLinear modules with fp32 A/B beside frozen base weights) and folding an
adapter into the weights while a checkpoint loads (`Adapter.deltas`, by checkpoint tensor name, before fusing
or quantizing). Knows nothing of data, optimizers or the engine.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError, ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# peft prefixes a module path with the wrapper's attributes (PeftModel.base_model = LoraModel, .model)
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])  # checkpoint module names
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise InvalidParameterError("lora_r", self.r, "must be a whole number >= 1 (8 or 16 are usual)")
        if not self.alpha > 0:
            raise InvalidParameterError("lora_alpha", self.alpha, "must be > 0 (usually 2 x r)")
        if not 0 <= self.dropout < 1:
            raise InvalidParameterError("lora_dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class Target:
    """One checkpoint module a LoRA can adapt, and where it lives in glmkit's model."""
    path: str          # the checkpoint's module path, e.g. model.layers.3.self_attn.q_proj
    module: str        # glmkit's linear, e.g. layers.3.attn.qkv
    rows: slice        # its rows of that linear's output (the whole output for an unfused module)
    in_features: int


def _row_slices(config, module: str) -> dict[str | None, slice]:
    """The output rows of each part of a fused linear (internal row order, as the loader fuses)."""
    if module.endswith("attn.qkv"):
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    if module.endswith("mlp.gate_up"):
        inter = config.intermediate_size
        return {"gate": slice(0, inter), "up": slice(inter, 2 * inter)}
    return {}


def fused_parts(config, module: str) -> int:
    """How many checkpoint modules (LoRA targets) can land in one of glmkit's linears: q, k and v or gate and up
    where the checkpoint keeps them apart (Llama, Qwen), one where it fuses them itself (ChatGLM, GLM-4)."""
    from .loader import FAMILIES

    _, names, _ = FAMILIES[config.model_type]
    suffix = module.rpartition("layers.")[2].partition(".")[2]  # attn.qkv, mlp.gate_up ...
    if any(f".{suffix}." in target and "#" in target for _, target in names):
        return max(1, len(_row_slices(config, module)))
    return 1


def checkpoint_names(model_dir: Path) -> list[str]:
    """The tensor names of a checkpoint directory, read from its headers (no tensor data)."""
    from .loader import _tensor_names, _weight_files

    return [name for path in _weight_files(model_dir) for name in _tensor_names(path)]


def targets_of(tensor_names: list[str], config, model: nn.Module) -> dict[str, Target]:
    """Every adaptable module of a checkpoint with these tensor names, by its module path."""
    from .loader import FAMILIES, _map_name

    _, names, skip = FAMILIES[config.model_type]
    found: dict[str, Target] = {}
    for name in tensor_names:
        if not name.endswith(".weight"):
            continue
        try:
            mapped = _map_name(name, names, skip)
        except ModelLoadError:
            continue
        if mapped is None:
            continue
        internal, _, part = mapped.partition("#")
        module = internal.removesuffix(".weight")
        if not module.startswith("layers.") or not module.endswith(("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")):
            continue
        linear = model.get_submodule(module)
        rows = _row_slices(config, module).get(part or None, slice(0, linear.out_features))
        path = name.removesuffix(".weight")
        found[path] = Target(path, module, rows, linear.in_features)
    return found


def select_targets(targets: dict[str, Target], wanted: list[str]) -> list[Target]:
    """The targets whose last name component (or whole path) is in `wanted`; `all-linear`: every one."""
    if ALL_LINEAR in wanted:
        return list(targets.values())
    short = {path.rpartition(".")[2] for path in targets}
    unknown = [w for w in wanted if w not in short and w not in targets]
    if unknown:
        raise InvalidParameterError("target_modules", unknown, f"this model has no such linear layers; its layers "
                                    f"are {', '.join(sorted(short))} (or {ALL_LINEAR})")
    return [t for path, t in targets.items() if path in wanted or path.rpartition(".")[2] in wanted]


class LoraLinear(nn.Module):
    """A frozen linear (float or quantized) plus low-rank updates of some of its output rows, one per target.

    The targets' A matrices are stacked ([targets * r, in]) and their B matrices kept one under the other
    ([sum of the targets' rows, r]); the forward pass lays B out block-diagonally ([out, targets * r], zero outside
    each target's rows and rank columns; a small tensor), so the whole update is two products, the second fused
    with the add into the base output (addmm): q, k and v of a fused projection cost what one target does. A and
    B stay in fp32 (the optimizer's master copy) and are cast to the activations' dtype in the forward pass, whose
    autograd returns their gradients in fp32."""

    def __init__(self, base: nn.Module, targets: list[Target], r: int, scale: float, dropout: float):
        super().__init__()
        self.base, self.r, self.scale = base, r, scale
        self.targets = sorted(targets, key=lambda t: t.rows.start)
        self.offsets = [0]  # each target's first row in lora_B
        for t in self.targets:
            self.offsets.append(self.offsets[-1] + t.rows.stop - t.rows.start)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r * len(self.targets), base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.offsets[-1], r, dtype=torch.float32))
        for i in range(len(self.targets)):  # as peft: A uniform (Kaiming), B zero, so the update starts at 0
            nn.init.kaiming_uniform_(self.lora_A.data[i * r:(i + 1) * r], a=math.sqrt(5))
        self.whole = len(self.targets) == 1 and self.targets[0].rows == slice(0, base.out_features)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _index(self, path: str) -> int:
        return next(i for i, t in enumerate(self.targets) if t.path == path)

    def get(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [rows, r]) of one target, as peft stores them (views of the parameters)."""
        i, r = self._index(path), self.r
        return self.lora_A.data[i * r:(i + 1) * r], self.lora_B.data[self.offsets[i]:self.offsets[i + 1]]

    def set(self, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
        mine_a, mine_b = self.get(path)
        if mine_a.shape != a.shape or mine_b.shape != b.shape:
            raise ModelLoadError(f"adapter module {path!r}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                                 f"A {tuple(mine_a.shape)} / B {tuple(mine_b.shape)} (a different rank or model)")
        mine_a.copy_(a)
        mine_b.copy_(b)

    def block_b(self, dtype: torch.dtype) -> torch.Tensor:
        """B laid out over the whole output: [out, targets * r]."""
        b = self.lora_B.to(dtype)
        if self.whole:
            return b
        rank, rows, end = self.r * len(self.targets), [], 0
        for i, t in enumerate(self.targets):
            if t.rows.start > end:  # rows no target adapts (e.g. k when q and v are the targets)
                rows.append(b.new_zeros(t.rows.start - end, rank))
            rows.append(F.pad(b[self.offsets[i]:self.offsets[i + 1]], (i * self.r, rank - (i + 1) * self.r)))
            end = t.rows.stop
        if end < self.out_features:
            rows.append(b.new_zeros(self.out_features - end, rank))
        return torch.cat(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        z = F.linear(self.dropout(x), self.lora_A.to(x.dtype))                  # [..., targets * r]
        rows = y.reshape(-1, y.shape[-1])
        out = torch.addmm(rows, z.reshape(-1, z.shape[-1]), self.block_b(x.dtype).t(), alpha=self.scale)
        return out.view(y.shape)


def add_lora(model: nn.Module, targets: list[Target], config: LoraConfig) -> dict[str, LoraLinear]:
    """Wrap each targeted linear in a LoraLinear and freeze everything else. Returns the LoraLinear holding each
    target, by checkpoint module path (what `save_adapter` writes)."""
    config.check()
    for p in model.parameters():
        p.requires_grad_(False)
    by_module: dict[str, list[Target]] = {}
    for target in targets:
        by_module.setdefault(target.module, []).append(target)
    device = next(model.parameters()).device
    holders: dict[str, LoraLinear] = {}
    for module, group in by_module.items():
        parent_name, _, child = module.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapper = LoraLinear(getattr(parent, child), group, config.r, config.scale, config.dropout).to(device)
        setattr(parent, child, wrapper)
        holders.update({t.path: wrapper for t in group})
    return holders


def save_adapter(out_dir: Path, parts: dict[str, LoraLinear], config: LoraConfig, base_model: str) -> None:
    """peft's LoRA format: adapter_config.json + adapter_model.safetensors, checkpoint module names."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, holder in parts.items():
        a, b = holder.get(path)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.float().cpu().contiguous()
    tmp = out_dir / (ADAPTER_WEIGHTS[0] + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / ADAPTER_WEIGHTS[0])
    modules = sorted({path.rpartition(".")[2] for path in parts})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": modules,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": config.use_rslora, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2), encoding="utf-8")


@dataclass
class Adapter:
    """A LoRA adapter read from disk: (A, B) by checkpoint module path, and its config."""
    path: Path
    config: LoraConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def deltas(self) -> dict[str, torch.Tensor]:
        """scale * B @ A by checkpoint *tensor* name (`<module>.weight`), in fp32: what folding adds."""
        return {f"{path}.weight": (b.float() @ a.float()) * self.config.scale for path, (a, b) in self.weights.items()}


def _refuse(path: Path, field_name: str, value, fix: str):
    raise ModelLoadError(f"{path / ADAPTER_CONFIG}: {field_name}={value!r} is not supported; {fix}")


def lora_rank(adapter_dir: str | Path) -> int | None:
    """The rank in a LoRA directory's adapter_config.json, without reading its weights (None: not a readable
    LoRA; loading it says why)."""
    try:
        r = json.loads((Path(adapter_dir).expanduser() / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("r")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return r if isinstance(r, int) and r > 0 else None


def read_adapter_weights(path: Path) -> tuple[Path, object]:
    """(file, what it holds) of a peft adapter directory's weights: adapter_model.safetensors or .bin."""
    file = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if file is None:
        raise ModelLoadError(f"{path} has no adapter weights: expected {' or '.join(ADAPTER_WEIGHTS)}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return file, load_file(str(file))
        return file, torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file fails as its reader pleases
        raise ModelLoadError(f"{file} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """A peft LoRA directory (adapter_config.json + adapter_model.safetensors or .bin)."""
    path = Path(adapter_dir).expanduser()
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no {ADAPTER_CONFIG}; pass the directory a LoRA fine-tuning saved "
                             "(glmkit finetune's --output, or peft's save_pretrained)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{config_path} cannot be read as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_path} holds {type(raw).__name__}, not a JSON object of LoRA settings")
    if raw.get("peft_type", "LORA") != "LORA":
        _refuse(path, "peft_type", raw.get("peft_type"), "glmkit loads LoRA adapters here")
    if raw.get("use_dora"):
        _refuse(path, "use_dora", True, "DoRA adapters are not supported; train a plain LoRA")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        _refuse(path, "rank_pattern", raw.get("rank_pattern") or raw.get("alpha_pattern"),
                "adapters with a rank or alpha per layer are not supported")
    if raw.get("fan_in_fan_out"):
        _refuse(path, "fan_in_fan_out", True, "only adapters of nn.Linear layers (GPT-2's Conv1D is not one)")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        _refuse(path, "bias" if raw.get("bias", "none") != "none" else "modules_to_save",
                raw.get("bias") if raw.get("bias", "none") != "none" else raw.get("modules_to_save"),
                "adapters that also train biases or whole modules are not supported")
    file, state = read_adapter_weights(path)
    if not isinstance(state, dict):
        raise ModelLoadError(f"{file} holds {type(state).__name__}, not a dict of LoRA tensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise ModelLoadError(f"{file}: tensor {key!r} is not a LoRA A/B matrix; only LoRA weights are expected")
        pairs.setdefault(m[1], {})[m[2]] = tensor
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ModelLoadError(f"{file}: module {module!r} has lora_{'A' if 'A' in ab else 'B'} but not the other")
        weights[module] = (ab["A"], ab["B"])
    r = int(raw.get("r", 8))
    config = LoraConfig(r=r, alpha=float(raw.get("lora_alpha", r)), dropout=float(raw.get("lora_dropout") or 0),
                        target_modules=sorted({m.rpartition(".")[2] for m in weights}),
                        use_rslora=bool(raw.get("use_rslora")))
    return Adapter(path, config, weights)


def merge_into(model_dir: Path, adapter: Adapter, out_dir: Path) -> Path:
    """Write `model_dir` with the adapter folded into its weights to `out_dir`: the same tensor names, shards and
    dtypes (`.bin` shards become `.safetensors`), every other file copied, so what loaded the original (glmkit,
    transformers, the model's own code) loads the result."""
    from safetensors.torch import save_file

    from .export import copy_other_files
    from .loader import _read_tensors, _weight_files

    if (out_dir / "config.json").exists():
        raise InvalidParameterError("output", str(out_dir), "already holds a model; choose a new directory")
    deltas = adapter.deltas()
    files = _weight_files(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for path in files:
        name = path.name.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        shard = {}
        for key, tensor in _read_tensors(path):
            delta = deltas.pop(key, None)
            if delta is not None:
                if delta.shape != tensor.shape:
                    raise ModelLoadError(f"the adapter's update for {key!r} has shape {tuple(delta.shape)} but the "
                                         f"weight is {tuple(tensor.shape)}; the adapter is for a different model")
                tensor = (tensor.float() + delta).to(tensor.dtype)
            shard[key] = tensor.contiguous()
            weight_map[key] = name
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
    if deltas:
        raise ModelLoadError(f"the adapter adapts {sorted(deltas)[0]!r}, which {model_dir} does not have; the "
                             "adapter was trained on a different model")
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    copy_other_files(model_dir, out_dir, keep_config=True)
    return out_dir
