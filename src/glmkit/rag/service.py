"""Knowledge: the knowledge bases one process works with (the terminal chat, `glmkit kb`, the server, the
agent's tool): the library folder, the embedders the bases were built with, and the chat model's token counter.

A knowledge base remembers the embedding model it was built with (`default`, a local path, or none for keyword
only); questions to it are embedded by that same model, loaded on first use. The server hands in its own
Embedder, so a knowledge base built with the server's model shares the queue of /v1/embeddings."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import GlmkitError, InvalidParameterError
from . import Hit
from .answer import Grounded, ground, last_question
from .index import IndexReport, add_files
from .library import Library, default_root
from .retrieve import load_reranker, search
from .store import KnowledgeBase, Settings


ENGLISH_ONLY = {"default"}  # embedders whose ranking of Chinese text is noise (all-MiniLM-L6-v2): not asked


def embedding_spec(value: str | None) -> str | None:
    """--embedding-model as a knowledge base records it: 'default', an absolute path, or None (keyword only)."""
    if value in (None, "", "none"):
        return None
    if value == "default":
        return value
    path = Path(value).expanduser()
    if not path.is_dir():
        raise InvalidParameterError("--embedding-model", value, "is not a folder; pass a local sentence-transformers "
                                    "model folder (e.g. bge-small-zh), 'default' or 'none'")
    return str(path.resolve())


class Knowledge:
    def __init__(self, count_tokens: Callable[[str], int], tokenizer: str, root: Path | None = None,
                 embedding: str | None = "default", embedders: dict | None = None, reranker: str | None = None):
        """embedding: what new knowledge bases are built with; embedders: already loaded ones by spec;
        reranker: a local cross-encoder folder that orders the fused candidates (loaded on first search)."""
        self.library = Library(root or default_root())
        self.count_tokens, self.tokenizer, self.embedding = count_tokens, tokenizer, embedding
        self.reranker = reranker
        self._rerank = None
        self._embedders = dict(embedders or {})
        self._bases: dict[str, KnowledgeBase] = {}
        self._lock = threading.Lock()

    def embedder(self, spec: str):
        with self._lock:
            if spec not in self._embedders:
                from .embeddings import Embedder, INSTALL_HINT
                import importlib.util

                if importlib.util.find_spec("sentence_transformers") is None:
                    raise GlmkitError(f"this knowledge base uses the embedding model {spec!r}, which needs "
                                      f"sentence-transformers: {INSTALL_HINT}")
                self._embedders[spec] = Embedder(spec)
            return self._embedders[spec]

    def embed_for(self, kb: KnowledgeBase) -> Callable[[list[str]], object] | None:
        spec = kb.settings.embedding
        return None if spec is None else self.embedder(spec).encode

    def create(self, name: str, chunk_tokens: int = 300, overlap: int = 50) -> KnowledgeBase:
        dimensions = self.embedder(self.embedding).dimensions if self.embedding else None
        settings = Settings(embedding=self.embedding, dimensions=dimensions, chunk_tokens=chunk_tokens,
                            overlap=overlap, tokenizer=self.tokenizer)
        kb = self.library.create(name, settings)
        with self._lock:
            self._bases[name] = kb
        return kb

    def open(self, name: str) -> KnowledgeBase:
        with self._lock:
            kb = self._bases.get(name)
            if kb is None:
                kb = self._bases[name] = self.library.open(name)
            return kb

    def delete(self, name: str) -> None:
        with self._lock:
            kb = self._bases.pop(name, None)
        if kb is not None:
            kb.close()
        self.library.delete(name)

    def add(self, name: str, paths: list[Path], *, prune: bool = False, progress: bool = True,
            named: dict[Path, str] | None = None) -> IndexReport:
        kb = self.open(name)
        return add_files(kb, paths, self.count_tokens, self.embed_for(kb), prune=prune, progress=progress,
                         named=named)

    def search(self, name: str, query: str, top_k: int = 5, mode: str = "hybrid") -> list[Hit]:
        """Blocking (the query's embedding waits its turn on the embedder): call it off the event loop."""
        kb = self.open(name)
        if mode == "dense" and kb.settings.embedding is None:
            raise InvalidParameterError("mode", mode, f"knowledge base {name!r} has no embeddings (it was made for "
                                        "keyword search only); use mode 'keyword' or 'hybrid'")
        embed = self.embed_for(kb) if mode != "keyword" else None
        vector = embed([query])[0] if embed is not None else None
        return search(kb, query, vector, top_k=top_k, mode=mode, rerank=self._reranker(),
                      dense_chinese=kb.settings.embedding not in ENGLISH_ONLY)

    def _reranker(self):
        with self._lock:
            if self.reranker is not None and self._rerank is None:
                self._rerank = load_reranker(self.reranker)
            return self._rerank

    def ground(self, name: str, messages: list[dict], room: int) -> Grounded:
        """Retrieve for the last user message of `messages` and put the passages that fit `room` tokens into
        its turn (blocking: call it off the event loop)."""
        question = last_question(messages)
        if question is None:  # nothing to search for (no user text): nothing found
            return Grounded(messages, [], "")
        return ground(messages, self.search(name, question), question, self.count_tokens, room)

    def close(self) -> None:
        with self._lock:
            for kb in self._bases.values():
                kb.close()
            self._bases.clear()
