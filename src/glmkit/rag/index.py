"""Adding files to a knowledge base: load, split, embed and store each file in its own transaction.

Incremental by content: a file whose bytes are unchanged (same sha256) is skipped, a changed one is replaced
whole, so re-running `glmkit kb create` on a folder only does the new work, and a run that is interrupted keeps
every file it finished. A file that cannot be read is reported and skipped; the rest are indexed."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chunking import split
from .loaders import UnreadableDocument, find_files, load
from .store import KnowledgeBase

log = logging.getLogger("glmkit")
Embed = Callable[[list[str]], np.ndarray]  # texts -> unit vectors [len(texts), dimensions]


@dataclass
class IndexReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, why)
    chunks: int = 0  # chunks written by this run

    def as_dict(self) -> dict:
        return {"added": self.added, "updated": self.updated, "unchanged": self.unchanged, "removed": self.removed,
                "skipped": [{"source": s, "reason": r} for s, r in self.skipped], "chunks": self.chunks}

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.updated)} updated", f"{len(self.unchanged)} unchanged"]
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts) + f"; {self.chunks} chunks written"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def index_text(chunk) -> str:
    """What the embedder sees for a chunk: its heading path gives a short passage its topic."""
    return f"{chunk.heading}\n{chunk.text}" if chunk.heading else chunk.text


def add_files(kb: KnowledgeBase, paths: list[Path], count_tokens: Callable[[str], int], embed: Embed | None,
              *, prune: bool = False, progress: bool = True, named: dict[Path, str] | None = None) -> IndexReport:
    """Index `paths` (files or folders) into `kb`. prune: also remove the sources that the folders no longer hold
    (`kb create` run again on the same folder). named: explicit source names for some files (uploads)."""
    from tqdm import tqdm

    files = find_files(paths)
    if named:
        files = [(p, named.get(p, s)) for p, s in files]
    report = IndexReport()
    settings = kb.settings
    with tqdm(files, desc=f"indexing {kb.name}", unit="file", disable=None if progress else True) as bar:
        for path, source in bar:
            bar.set_postfix_str(source[-40:], refresh=False)
            _add_one(kb, path, source, count_tokens, embed, settings, report)
    if prune:
        present = {s for _, s in files}
        for entry in kb.files():
            if entry.source not in present and kb.remove(entry.source):
                report.removed.append(entry.source)
    return report


def _add_one(kb, path: Path, source: str, count_tokens, embed, settings, report: IndexReport) -> None:
    try:
        fingerprint = digest(path)
    except OSError as e:
        report.skipped.append((source, f"cannot read: {e.strerror or e}"))
        return
    known = kb.digest(source)
    if known == fingerprint:
        report.unchanged.append(source)
        return
    try:
        document = load(path, source)
    except UnreadableDocument as e:
        log.debug("glmkit: %s", e)
        report.skipped.append((source, e.reason))
        return
    chunks = split(document, count_tokens, settings.chunk_tokens, settings.overlap)
    vectors = embed([index_text(c) for c in chunks]) if embed is not None and chunks else None
    kb.replace(source, fingerprint, chunks, vectors)
    (report.added if known is None else report.updated).append(source)
    report.chunks += len(chunks)
