"""EngineConfig: how the model is loaded and run. A dataclass that validates itself; no environment reads."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .errors import InvalidParameterError

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}
QUANTIZATION_MODES = ("auto", "none", "int8", "int8a8", "int4")


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def check_adapter_name(name) -> str:
    """An adapter's name (what requests put in `model`): letters, digits and . _ : / -, up to 128."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise InvalidParameterError("adapter name", name, "must be 1-128 letters, digits or . _ : / - (starting "
                                    "with a letter or digit), e.g. sales")
    return name


@dataclass
class EngineConfig:
    model: str | None = None            # None: the embedded default model
    dtype: str = "auto"                 # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"                # auto: cuda if available, else cpu
    chat_format: str | None = None      # None: chosen from the checkpoint
    max_model_len: int | None = None    # None: the model's own limit (capped by the KV cache)
    kv_cache_memory_gb: float | None = None  # None: 2 GiB on CPU, 40% of free memory on GPU
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget per step; longer prompts are prefilled in chunks
    enable_prefix_caching: bool = True
    num_threads: int | None = None      # CPU threads for torch; None: torch's default
    enforce_eager: bool = False         # CUDA: no CUDA graphs for the decode step (slower; for debugging)
    quantization: str = "auto"          # none, int8, int4; auto: what the checkpoint holds, and for the embedded
                                        # default model on a CPU with bf16 instructions the measured fastest mode
    adapters: dict[str, str] | None = None  # adapters served beside the base: name -> directory (a peft LoRA or
                                            # ChatGLM P-Tuning v2)
    max_adapters: int = 32              # adapters loaded at once (at start and by load_adapter), a memory guard
    # CUDA: LoRA weights resident on the GPU, in slots sized up front so the CUDA graphs run adapter rows too
    # (others wait in pinned host memory, swapped in least recently used first). The slots exist when adapters
    # are given at start or max_lora_rank is set; their rank is max_lora_rank, else the start adapters' highest.
    max_gpu_adapters: int = 8
    max_lora_rank: int | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InvalidParameterError("dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise InvalidParameterError("device", self.device, "must be auto, cpu, cuda or cuda:N")
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "num_threads", "max_adapters",
                     "max_gpu_adapters", "max_lora_rank"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidParameterError(name, value, "must be a positive integer")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise InvalidParameterError("kv_cache_memory_gb", self.kv_cache_memory_gb, "must be > 0 (GiB)")
        if self.quantization not in QUANTIZATION_MODES:
            raise InvalidParameterError("quantization", self.quantization, "must be one of "
                                        f"{', '.join(QUANTIZATION_MODES)}")
        for name in self.adapters or {}:
            check_adapter_name(name)
        if len(self.adapters or {}) > self.max_adapters:
            raise InvalidParameterError("adapters", len(self.adapters), f"are more than max_adapters "
                                        f"({self.max_adapters}); raise --max-adapters")
        if self.block_size not in (8, 16, 32, 64, 128, 256):
            raise InvalidParameterError("block_size", self.block_size, "must be one of 8, 16, 32, 64, 128, 256")

    def summary(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())
