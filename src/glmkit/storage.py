"""What glmkit's SQLite stores share (the web page's conversations, the knowledge bases): where their data lives,
and a write transaction that takes the database's write lock up front."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def data_dir() -> Path:
    """$GLMKIT_HOME, else the XDG data directory's glmkit folder (read at call time, never at import)."""
    home = os.environ.get("GLMKIT_HOME")
    if home:
        return Path(home).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "glmkit"


@contextmanager
def write_transaction(db: sqlite3.Connection, lock: threading.Lock) -> Iterator[None]:
    """BEGIN IMMEDIATE (another process's writer makes this one wait for the busy timeout, instead of failing
    halfway), committed when the block ends, rolled back if it raises."""
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
