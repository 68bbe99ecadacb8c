"""The web chat page's conversations, kept per user in one SQLite file so they survive a restart: create, list
(the sidebar), get, save (the whole message list at once), rename, delete, the images a conversation produced
(files in a folder beside the database), and export as JSON or Markdown.

Messages are OpenAI chat messages stored as given, extra "glmkit" display key included. Knows nothing of
Gradio, HTTP or the engine: the owner is whatever string the caller names (the logged-in user), and checking
messages is the caller's job.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ...errors import GlmkitError, InvalidParameterError, excerpt
from ...storage import data_dir, write_transaction

SCHEMA_VERSION = 1
TITLE_MAX_CHARS = 200
DERIVED_TITLE_CHARS = 40
_ID = re.compile(r"[0-9a-f]{32}")
_IMAGE_NAME = re.compile(r"image-(\d+)\.png")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    title TEXT NOT NULL,
    mode TEXT NOT NULL,
    settings TEXT NOT NULL,
    messages TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated);
"""
_COLUMNS = "id, owner, title, mode, settings, messages, created, updated"


def default_path() -> Path:
    """$GLMKIT_HOME/web.sqlite3, else the XDG data directory's glmkit/web.sqlite3 (read at call time)."""
    return data_dir() / "web.sqlite3"


@dataclass
class ConversationInfo:
    """A sidebar row."""
    id: str
    title: str
    mode: str
    updated: float


@dataclass
class Conversation:
    id: str
    owner: str
    title: str
    mode: str
    settings: dict
    messages: list[dict]
    created: float
    updated: float


class ConversationNotFound(GlmkitError, KeyError):
    """No such conversation for this owner. Absent and someone else's read the same, so an id tells a caller
    nothing about other users."""

    def __init__(self, conversation_id: str):
        super().__init__(f"conversation {excerpt(conversation_id)} not found; it may have been deleted")
        self.conversation_id = conversation_id

    def __str__(self) -> str:  # KeyError's would quote the message like a key
        return str(self.args[0])


class ConversationStore:
    """One SQLite connection shared by every thread behind a lock: the page's writes are small and few, and
    one connection can never see SQLITE_BUSY from itself. Writes take the write lock at their start (BEGIN
    IMMEDIATE), so a second store on the same file (another process) waits instead of failing mid-update."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._create_schema()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise GlmkitError(f"{self.path}: not a glmkit conversation store ({e}); move it away or set "
                              "GLMKIT_HOME to another folder") from e
        except GlmkitError:
            self._db.close()
            raise

    def _create_schema(self) -> None:
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise GlmkitError(f"{self.path} has schema version {version} but this glmkit reads up to "
                                  f"{SCHEMA_VERSION}; upgrade glmkit or set GLMKIT_HOME to another folder")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _write(self):
        return write_transaction(self._db, self._lock)

    def _row(self, owner: str, conversation_id: str) -> tuple:
        """The conversation's row (caller holds the lock), or ConversationNotFound."""
        row = None
        if isinstance(conversation_id, str) and _ID.fullmatch(conversation_id):
            row = self._db.execute(f"SELECT {_COLUMNS} FROM conversations WHERE id = ? AND owner = ?",
                                   (conversation_id, owner)).fetchone()
        if row is None:
            raise ConversationNotFound(conversation_id)
        return row

    def create(self, owner: str, mode: str = "chat", title: str = "", settings: dict | None = None) -> Conversation:
        title = _checked_title(title) if title.strip() else ""
        now = time.time()
        conversation = Conversation(uuid.uuid4().hex, owner, title, mode, dict(settings or {}), [], now, now)
        with self._write():
            self._db.execute(f"INSERT INTO conversations ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             _to_row(conversation))
        return conversation

    def list(self, owner: str) -> list[ConversationInfo]:
        with self._lock:
            rows = self._db.execute("SELECT id, title, mode, updated FROM conversations WHERE owner = ? "
                                    "ORDER BY updated DESC, created DESC, id", (owner,)).fetchall()
        return [ConversationInfo(*row) for row in rows]

    def get(self, owner: str, conversation_id: str) -> Conversation:
        with self._lock:
            return _from_row(self._row(owner, conversation_id))

    def save(self, owner: str, conversation_id: str, messages: list[dict], *, mode: str | None = None,
             settings: dict | None = None) -> Conversation:
        """Replaces the messages (and the mode or settings when given); an untitled conversation takes its
        title from its first user message."""
        with self._write():
            c = _from_row(self._row(owner, conversation_id))
            c.messages = list(messages)
            c.mode = c.mode if mode is None else mode
            c.settings = c.settings if settings is None else dict(settings)
            c.title = c.title or _derive_title(messages)
            c.updated = time.time()
            self._db.execute("UPDATE conversations SET title = ?, mode = ?, settings = ?, messages = ?, "
                             "updated = ? WHERE id = ?",
                             (c.title, c.mode, _dumps(c.settings), _dumps(c.messages), c.updated, c.id))
        return c

    def rename(self, owner: str, conversation_id: str, title: str) -> None:
        title = _checked_title(title)
        with self._write():
            self._row(owner, conversation_id)
            self._db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    def delete(self, owner: str, conversation_id: str) -> None:
        with self._write():
            self._row(owner, conversation_id)
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        shutil.rmtree(self._image_path(conversation_id), ignore_errors=True)

    def _image_path(self, conversation_id: str) -> Path:
        # The id becomes a folder name: only our own ids (32 hex digits) may, never "../x".
        if not (isinstance(conversation_id, str) and _ID.fullmatch(conversation_id)):
            raise ConversationNotFound(conversation_id)
        return self.path.parent / "web-images" / conversation_id

    def image_dir(self, conversation_id: str) -> Path:
        folder = self._image_path(conversation_id)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save_image(self, owner: str, conversation_id: str, png: bytes) -> Path:
        """Writes image-N.png (N one past the highest there) in the conversation's image folder."""
        with self._lock:  # numbering the file and writing it are one step for this store's threads
            self._row(owner, conversation_id)
            folder = self.image_dir(conversation_id)
            numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _IMAGE_NAME.fullmatch(p.name))]
            number = max(numbers, default=0) + 1
            while True:
                path = folder / f"image-{number}.png"
                try:
                    with open(path, "xb") as f:  # "x": another process's image of the same number survives
                        f.write(png)
                    return path
                except FileExistsError:
                    number += 1

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _checked_title(title: str) -> str:
    stripped = title.strip() if isinstance(title, str) else ""
    if not 1 <= len(stripped) <= TITLE_MAX_CHARS:
        raise InvalidParameterError("title", title, f"must be 1 to {TITLE_MAX_CHARS} characters once stripped "
                                    "of surrounding whitespace")
    return stripped


def _to_row(c: Conversation) -> tuple:
    return (c.id, c.owner, c.title, c.mode, _dumps(c.settings), _dumps(c.messages), c.created, c.updated)


def _from_row(row: tuple) -> Conversation:
    id_, owner, title, mode, settings, messages, created, updated = row
    return Conversation(id_, owner, title, mode, json.loads(settings), json.loads(messages), created, updated)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _message_text(message: dict) -> str:
    """A message's text: its content string, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content
                         if isinstance(part, dict) and part.get("type") == "text")
    return ""


def _derive_title(messages: list[dict]) -> str:
    """The first user message's text, whitespace collapsed, at most DERIVED_TITLE_CHARS characters ("…" last
    when cut); "" while there is none."""
    for message in messages:
        if message.get("role") == "user":
            text = " ".join(_message_text(message).split())
            if len(text) > DERIVED_TITLE_CHARS:
                text = text[:DERIVED_TITLE_CHARS - 1].rstrip() + "…"
            return text
    return ""


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def export_json(conversation: Conversation) -> str:
    c = conversation
    return json.dumps({"id": c.id, "title": c.title, "mode": c.mode, "settings": c.settings,
                       "created": _iso(c.created), "updated": _iso(c.updated), "messages": c.messages},
                      ensure_ascii=False, indent=2)


def export_markdown(conversation: Conversation) -> str:
    blocks = [f"# {conversation.title or 'Untitled conversation'}"]
    for message in conversation.messages:
        blocks.extend(_message_blocks(message))
    return "\n\n".join(blocks) + "\n"


def _message_blocks(message: dict) -> list[str]:
    role = message.get("role", "")
    if role == "tool":
        name = message.get("name") or message.get("tool_call_id") or "tool"
        blocks = [f"**Observation** from `{name}`:", _fence("text", _message_text(message))]
    else:
        text = _message_text(message).strip()
        blocks = [f"**{role.capitalize() or 'Message'}**"] + ([text] if text else [])
    blocks.extend(_image_links(message))
    for call in message.get("tool_calls") or []:
        blocks.extend(_call_blocks(call.get("function") or {}))
    return blocks


def _image_links(message: dict) -> list[str]:
    paths = list((message.get("glmkit") or {}).get("images") or [])
    content = message.get("content")
    for part in content if isinstance(content, list) else []:
        url = (part.get("image_url") or {}).get("url", "") if isinstance(part, dict) else ""
        if url and not url.startswith("data:"):  # an inline image would be megabytes of base64 in the text
            paths.append(url)
    # <...> keeps a path with spaces or parentheses one link destination (CommonMark)
    return [f"![image](<{p}>)" if re.search(r"[\s()<>]", str(p)) else f"![image]({p})" for p in paths]


def _call_blocks(function: dict) -> list[str]:
    name = function.get("name", "")
    arguments = function.get("arguments", "")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:  # a model's broken JSON is still worth showing as written
        return [f"Tool call `{name}`:", _fence("json", arguments)]
    if name == "python" and isinstance(parsed, dict) and isinstance(parsed.get("code"), str):
        return ["Tool call `python`:", _fence("python", parsed["code"])]
    return [f"Tool call `{name}`:", _fence("json", json.dumps(parsed, ensure_ascii=False, indent=2))]


def _fence(language: str, text: str) -> str:
    """A fenced block longer than any backtick run in the text, so code containing ``` cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip(chr(10))}\n{fence}"
