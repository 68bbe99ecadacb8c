"""A knowledge base on disk: one folder holding one SQLite database (kb.sqlite3) with the settings, the files
added (with their sha256, so an unchanged file is skipped), the chunks with their embedding vectors, and an FTS5
index over the chunks' keyword tokens (glmkit.rag.text.words, space-joined, so FTS5's own tokenizer only splits
on the spaces; heading and text indexed together) whose bm25() ranks the keyword side.

Several processes may add to one knowledge base at once: the database is in WAL mode (readers never wait for a
writer), every write takes the write lock at its start (BEGIN IMMEDIATE) and waits up to 30 s for another
process's write to finish. Replacing a file's chunks is one transaction: a crash leaves the old chunks or the new
ones, never half.

Scale: the keyword side is FTS5's inverted index, read in place (nothing loaded), and a query ranks at most about
MATCH_BUDGET chunks however large the knowledge base (its common words are left out of the match), so a million
chunks stay searchable. The dense side is brute force over a float32 matrix held in memory per open
KnowledgeBase, loaded on the first dense query and again only after the database changed. 100k chunks of 384
dimensions are 150 MB, about 1 s to load and tens of ms a query on two busy cores (benchmarks/rag_speed.py);
1M are 1.5 GB (4 GB at bge-m3's 1024 dimensions), about 10 s to load and some hundreds of ms a query."""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import GlmkitError, InvalidParameterError
from ..storage import write_transaction
from . import Chunk
from .text import words

FORMAT = 1  # PRAGMA user_version: what this glmkit writes and the newest it reads
APPLICATION_ID = 0x676C6B62  # "glkb": PRAGMA application_id, tells a knowledge base from any other SQLite file
DATABASE = "kb.sqlite3"
BUSY_TIMEOUT_S = 30
_IN_BATCH = 500  # ids per "IN (...)": under SQLite's bound-parameter limit
MATCH_BUDGET = 10_000  # chunks a keyword query may rank: BM25 costs about a microsecond per chunk matched
_SCHEMA = f"""
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {FORMAT};
CREATE TABLE settings (id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);
CREATE TABLE files (source TEXT PRIMARY KEY, digest TEXT NOT NULL, chunks INTEGER NOT NULL, added TEXT NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, heading TEXT NOT NULL,
                     page INTEGER, text TEXT NOT NULL, vector BLOB);
CREATE INDEX chunks_by_source ON chunks (source);
CREATE VIRTUAL TABLE keywords USING fts5(words, tokenize="unicode61 remove_diacritics 0 tokenchars '_'");
CREATE VIRTUAL TABLE keyword_docs USING fts5vocab(keywords, 'row');
"""


@dataclass(frozen=True)
class Settings:
    """Fixed when the knowledge base is created: every chunk in it was cut and embedded this way."""

    embedding: str | None = None  # the embedding model's name; None: keyword search only
    dimensions: int | None = None  # its vectors' length (None without an embedding model)
    chunk_tokens: int = 300  # chunk size, in the chat model's tokens
    overlap: int = 50  # tokens repeated between neighbouring chunks
    tokenizer: str = ""  # the chat model the chunks were sized for (informational)

    def __post_init__(self):
        if self.embedding is None and self.dimensions is not None:
            raise InvalidParameterError("dimensions", self.dimensions, "needs an embedding model; pass neither "
                                        "for a keyword-only knowledge base")
        if self.embedding is not None and not _positive(self.dimensions):
            raise InvalidParameterError("dimensions", self.dimensions, f"must be a positive integer: the length "
                                        f"of {self.embedding!r}'s vectors")
        if not _positive(self.chunk_tokens):
            raise InvalidParameterError("chunk_tokens", self.chunk_tokens, "must be a positive integer")
        if not (isinstance(self.overlap, int) and 0 <= self.overlap < self.chunk_tokens):
            raise InvalidParameterError("overlap", self.overlap, f"must be an integer from 0 to chunk_tokens - 1 "
                                        f"({self.chunk_tokens - 1})")


@dataclass(frozen=True)
class FileEntry:
    source: str
    digest: str  # sha256 of the file's bytes when it was added
    chunks: int
    added: str  # ISO 8601, UTC


class KnowledgeBase:
    """One open knowledge base. Thread-safe: one connection behind a lock (a query is short, and one
    connection never sees SQLITE_BUSY from itself); open one per process."""

    def __init__(self, path: Path, db: sqlite3.Connection, settings: Settings):
        """Use create() or open()."""
        self._path = path
        self._db = db
        self._settings = settings
        self._lock = threading.Lock()
        self._matrix: tuple[int, np.ndarray, np.ndarray] | None = None  # (data_version, ids, unit vectors)

    @classmethod
    def create(cls, path: Path, settings: Settings) -> KnowledgeBase:
        path = Path(path).expanduser()
        database = path / DATABASE
        if path.exists() and not path.is_dir():
            raise GlmkitError(f"{path} is a file; a knowledge base is a folder: pick another path")
        path.mkdir(parents=True, exist_ok=True)
        try:
            database.touch(exist_ok=False)  # claims the path: of two creators, one fails here
        except FileExistsError:
            raise GlmkitError(f"a knowledge base already exists at {path}; open it, add files to it, or delete "
                              "it first") from None
        db = _connect(database)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO settings (id, json) VALUES (1, ?)", (json.dumps(asdict(settings)),))
            db.execute("COMMIT")
        except BaseException:
            db.close()
            database.unlink(missing_ok=True)
            raise
        return cls(path, db, settings)

    @classmethod
    def open(cls, path: Path) -> KnowledgeBase:
        path = Path(path).expanduser()
        database = path / DATABASE
        if not database.is_file():
            why = "does not exist" if not path.exists() else f"has no {DATABASE}"
            raise GlmkitError(f"no knowledge base at {path}: the folder {why}; create one first")
        db = _connect(database, must_exist=True)
        try:
            return cls(path, db, _read_settings(db, path))
        except BaseException:
            db.close()
            raise

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def settings(self) -> Settings:
        return self._settings

    def files(self) -> list[FileEntry]:
        with self._lock:
            rows = self._db.execute("SELECT source, digest, chunks, added FROM files ORDER BY source").fetchall()
        return [FileEntry(*row) for row in rows]

    def digest(self, source: str) -> str | None:
        """The sha256 the file had when added, None if it was not: an unchanged file need not be re-indexed."""
        with self._lock:
            row = self._db.execute("SELECT digest FROM files WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    def count(self) -> int:
        """Chunks in the knowledge base (summed over the files table: no scan of a million chunks)."""
        with self._lock:
            return self._db.execute("SELECT COALESCE(SUM(chunks), 0) FROM files").fetchone()[0]

    def replace(self, source: str, digest: str, chunks: list[Chunk], vectors: np.ndarray | None) -> None:
        """Make `chunks` (and their vectors, one row each) the file's whole content, in one transaction.
        Tokenizing and checking happen before the write lock is taken, so other writers wait only for the
        inserts."""
        for chunk in chunks:
            if chunk.source != source:
                raise InvalidParameterError("chunk.source", chunk.source, f"every chunk must come from the file "
                                            f"being replaced ({source!r})")
        blobs = self._vector_blobs(vectors, len(chunks))
        texts = [" ".join(words(c.heading) + words(c.text)) for c in chunks]
        added = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._write():
            self._delete(source)
            start = self._next_id()
            ids = range(start, start + len(chunks))
            self._db.executemany("INSERT INTO chunks (id, source, heading, page, text, vector) VALUES (?,?,?,?,?,?)",
                                 [(i, source, c.heading, c.page, c.text, b)
                                  for i, c, b in zip(ids, chunks, blobs)])
            self._db.executemany("INSERT INTO keywords (rowid, words) VALUES (?, ?)", zip(ids, texts))
            self._db.execute("INSERT INTO files (source, digest, chunks, added) VALUES (?, ?, ?, ?)",
                             (source, digest, len(chunks), added))

    def remove(self, source: str) -> bool:
        """Forget a file and its chunks; False if it was not there."""
        with self._write():
            return self._delete(source)

    def keyword(self, query: str, k: int) -> list[tuple[int, float]]:
        """Up to k (chunk id, coverage), best BM25 first. coverage: the share of the query's distinct words
        found in the chunk, each weighted by its rarity (IDF) in this knowledge base, so a passage holding
        the query's rare words scores high and one sharing only its common words low. A query of stopwords
        only has no words and finds nothing."""
        terms = list(dict.fromkeys(words(query)))
        if not terms:
            return []
        with self._lock:
            total = self._db.execute("SELECT COALESCE(SUM(chunks), 0) FROM files").fetchone()[0]
            docs = dict(self._db.execute(f"SELECT term, doc FROM keyword_docs WHERE term IN "
                                         f"({','.join('?' * len(terms))})", terms).fetchall())
            rows = self._db.execute("SELECT rowid, words FROM keywords WHERE keywords MATCH ? ORDER BY rank "
                                    "LIMIT ?", (_match(terms, docs), k)).fetchall()
        weights = {t: _idf(total, docs.get(t, 0)) for t in terms}
        whole = sum(weights.values())
        return [(rowid, _covered(weights, set(text.split())) / whole) for rowid, text in rows]

    def dense(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """Up to k (chunk id, cosine similarity), most similar first."""
        if self._settings.embedding is None:
            raise GlmkitError(f"knowledge base {self.name!r} has no embedding vectors (it was created for "
                              "keyword search only); search it with mode='keyword'")
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape != (self._settings.dimensions,) or not np.isfinite(query).all():
            raise InvalidParameterError("vector", vector, f"must be {self._settings.dimensions} finite numbers "
                                        f"(from {self._settings.embedding!r}, this knowledge base's embedder)")
        ids, matrix = self._vectors()
        norm = float(np.linalg.norm(query))
        if len(ids) == 0 or norm == 0:
            return []
        scores = matrix @ (query / norm)
        k = min(k, len(ids))
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(int(ids[i]), float(scores[i])) for i in best]

    def chunks(self, ids: Iterable[int]) -> dict[int, Chunk]:
        """The chunks with these ids (an id no longer there is left out)."""
        ids = list(ids)
        found: dict[int, Chunk] = {}
        with self._lock:
            for start in range(0, len(ids), _IN_BATCH):
                batch = ids[start:start + _IN_BATCH]
                rows = self._db.execute(f"SELECT id, source, heading, page, text FROM chunks WHERE id IN "
                                        f"({','.join('?' * len(batch))})", batch)
                found.update((row[0], Chunk(*row[1:])) for row in rows)
        return found

    def close(self) -> None:
        with self._lock:
            self._matrix = None
            self._db.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        with write_transaction(self._db, self._lock):
            yield
        self._matrix = None  # our own commits do not move our connection's data_version

    def _delete(self, source: str) -> bool:
        """Removes a file's chunks and row (caller holds the write transaction)."""
        self._db.execute("DELETE FROM keywords WHERE rowid IN (SELECT id FROM chunks WHERE source = ?)", (source,))
        self._db.execute("DELETE FROM chunks WHERE source = ?", (source,))
        return self._db.execute("DELETE FROM files WHERE source = ?", (source,)).rowcount > 0

    def _next_id(self) -> int:
        """The first unused chunk id (caller holds the write lock, so nobody else takes it); AUTOINCREMENT
        never hands out an id again, so an id held from an earlier search never names another chunk."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'").fetchone()
        return (row[0] if row else 0) + 1

    def _vector_blobs(self, vectors: np.ndarray | None, n: int) -> list[bytes | None]:
        """Each chunk's unit vector as float32 bytes (None in a keyword-only knowledge base)."""
        dimensions = self._settings.dimensions
        if dimensions is None:
            if vectors is not None:
                raise InvalidParameterError("vectors", vectors, f"knowledge base {self.name!r} is keyword-only "
                                            "(no embedding model): pass vectors=None")
            return [None] * n
        if vectors is None and n == 0:
            return []
        array = None if vectors is None else np.asarray(vectors, dtype=np.float32)
        if array is None or array.shape != (n, dimensions) or not np.isfinite(array).all():
            shape = "None" if array is None else str(tuple(array.shape))
            raise InvalidParameterError("vectors", shape, f"must be finite numbers of shape ({n}, {dimensions}): "
                                        f"one {self._settings.embedding} vector per chunk")
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        array = array / np.where(norms > 0, norms, 1)
        return [row.tobytes() for row in array]

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) of every chunk, cached until the database changes (PRAGMA data_version moves
        when another connection commits; our own commits clear the cache). Filled row by row into one
        preallocated matrix: a million vectors never sit in memory twice."""
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if self._matrix is None or self._matrix[0] != version:
                self._db.execute("BEGIN")  # one snapshot for the count and the rows
                try:
                    n = self._db.execute("SELECT COALESCE(SUM(chunks), 0) FROM files").fetchone()[0]
                    ids = np.empty(n, dtype=np.int64)
                    matrix = np.empty((n, self._settings.dimensions), dtype=np.float32)
                    for j, (chunk_id, blob) in enumerate(self._db.execute("SELECT id, vector FROM chunks")):
                        ids[j], matrix[j] = chunk_id, np.frombuffer(blob, dtype=np.float32)
                finally:
                    self._db.execute("COMMIT")
                self._matrix = (version, ids, matrix)
            return self._matrix[1], self._matrix[2]


def _connect(database: Path, must_exist: bool = False) -> sqlite3.Connection:
    """Autocommit mode (transactions are ours, explicit), usable from any thread (behind our lock)."""
    target = f"{database.resolve().as_uri()}?mode=rw" if must_exist else str(database)
    db = sqlite3.connect(target, uri=must_exist, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: still atomic and consistent after a crash, far faster writes
    return db


def _read_settings(db: sqlite3.Connection, path: Path) -> Settings:
    try:
        application, version = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("application_id", "user_version"))
        if application != APPLICATION_ID:
            raise GlmkitError(f"{path / DATABASE} is not a glmkit knowledge base; move it away or pick another "
                              "folder")
        if version > FORMAT:
            raise GlmkitError(f"knowledge base {path} has format {version} but this glmkit reads up to {FORMAT}; "
                              "upgrade glmkit")
        stored = json.loads(db.execute("SELECT json FROM settings WHERE id = 1").fetchone()[0])
    except sqlite3.DatabaseError as e:
        raise GlmkitError(f"{path / DATABASE} is not a readable glmkit knowledge base ({e}); move it away or pick "
                          "another folder") from e
    known = {f.name for f in fields(Settings)}
    return Settings(**{key: value for key, value in stored.items() if key in known})


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _idf(total: int, docs: int) -> float:
    """BM25's IDF, kept positive: a word in every chunk still weighs a little, one in none weighs most."""
    return math.log(1 + (total - docs + 0.5) / (docs + 0.5))


def _match(terms: list[str], docs: dict[str, int]) -> str:
    """The FTS5 query: the query's words joined by OR, rarest first, leaving out the common words past
    MATCH_BUDGET chunks (ranking every chunk that holds "system" or "1" would take most of a second in a large
    knowledge base, and those words weigh little in BM25 and in coverage). When even the rarest word is that
    common, only the chunks holding every word are ranked."""
    chosen, matched = [], 0
    for term in sorted(terms, key=lambda t: docs.get(t, 0)):
        if chosen and matched + docs.get(term, 0) > MATCH_BUDGET:
            break
        chosen.append(term)
        matched += docs.get(term, 0)
    quoted = [f'"{t}"' for t in (terms if matched > MATCH_BUDGET else chosen)]  # \w runs: nothing to escape
    return (" AND " if matched > MATCH_BUDGET else " OR ").join(quoted)


def _covered(weights: dict[str, float], present: set[str]) -> float:
    return sum(weight for term, weight in weights.items() if term in present)
