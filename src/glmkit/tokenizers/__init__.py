"""Pick and load the tokenizer a checkpoint directory ships."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelLoadError
from .base import Tokenizer


def _is_tiktoken_ranks(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(256)
    try:
        first = head.decode("ascii").splitlines()[0].split()
        return len(first) == 2 and first[1].isdigit()
    except (UnicodeDecodeError, IndexError):
        return False


def load_tokenizer(model_dir: Path) -> Tokenizer:
    config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if (model_dir / "tokenizer.json").is_file():
        from .hf import HFTokenizer

        return HFTokenizer(model_dir / "tokenizer.json", tok_config)
    sp_file = model_dir / "tokenizer.model"
    if sp_file.is_file():
        if _is_tiktoken_ranks(sp_file):
            from .glm4 import GLM4Tokenizer

            return GLM4Tokenizer(sp_file)
        from .chatglm_sp import ChatGLMSPTokenizer

        try:
            return ChatGLMSPTokenizer(sp_file)
        except Exception as e:
            raise ModelLoadError(f"{sp_file} is neither a SentencePiece model nor a tiktoken ranks file ({e})")
    raise ModelLoadError(f"{model_dir} has no tokenizer: expected tokenizer.json, or tokenizer.model "
                         "(SentencePiece for ChatGLM2/3, tiktoken ranks for GLM-4); copy the tokenizer files "
                         "from the model's release into this directory")
