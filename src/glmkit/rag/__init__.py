"""Knowledge bases: answers from the user's own documents, with citations.

The pipeline, one module per step, one type across each hop:

    loaders.load(path)                       -> Document (sections with heading path and page)
    chunking.split(document, count_tokens)   -> list[Chunk] (sentence-aware, sized in the chat model's tokens)
    index.add_files(kb, paths, ...)          -> IndexReport (incremental: unchanged files are skipped)
    store.KnowledgeBase                      (SQLite: chunks, an FTS5 keyword index, embedding vectors)
    retrieve.search(kb, query, vector, ...)  -> list[Hit] (keyword + dense, fused by reciprocal rank)
    answer.ground(messages, hits, ...)       -> Grounded: the messages that ask the model to answer and cite

service.Knowledge ties them together for a process (the terminal, `glmkit kb`, the server, the agent's tool),
with the embedders (embeddings.py, shared with /v1/embeddings). Retrieval runs outside the engine: a slow
search never holds a batch slot."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """A stretch of a document under one heading (and on one page, for a pdf)."""

    text: str
    heading: str = ""  # the heading path, outermost first, joined by " > "
    page: int | None = None  # 1-based page number (pdf), else None


@dataclass(frozen=True)
class Document:
    source: str  # the file's path as the knowledge base names it (relative to the folder it was added from)
    sections: tuple[Section, ...]


@dataclass(frozen=True)
class Chunk:
    source: str
    heading: str
    page: int | None
    text: str


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk. `score` is the fused score, 1.0 for a chunk ranked first by every retriever; `keyword`
    is the share of the query's words (weighted by rarity) found in the chunk, `dense` the cosine similarity;
    either is None when that retriever did not return the chunk."""

    chunk: Chunk
    score: float
    keyword: float | None = None
    dense: float | None = None

    def citation(self) -> dict:
        return {"source": self.chunk.source, "heading": self.chunk.heading, "page": self.chunk.page,
                "text": self.chunk.text, "score": round(self.score, 4)}


# What knowledge bases import beyond glmkit's own dependencies (module -> package), all in the `rag` extra.
EXTRA = {"jieba": "jieba", "Stemmer": "PyStemmer", "pypdf": "pypdf", "docx": "python-docx", "bs4": "beautifulsoup4",
         "charset_normalizer": "charset-normalizer"}


def require() -> None:
    """Refuse at once, naming what is missing, when the rag extra is not installed."""
    import importlib.util

    from ..errors import GlmkitError

    missing = [package for module, package in EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise GlmkitError(f"knowledge bases need the rag extra ({', '.join(missing)} missing): "
                          "pip install 'glmkit[rag]'")
