"""Reading what the user types, with prompt_toolkit: line editing, history kept across sessions, and multi-line
messages (a bracketed paste is one message; a line opening with \"\"\" starts a block that runs to a closing
\"\"\"; Alt-Enter or Esc-Enter inserts a newline).

Knows nothing of slash commands' meaning (it only completes their names on Tab), models or the conversation.
Imported only for an interactive session: piped input never loads prompt_toolkit.
"""

from __future__ import annotations

import os
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

BLOCK = '"""'


def history_path() -> Path:
    """$GLMKIT_HOME/chat_history, else the XDG config directory's glmkit/chat_history (read at call time)."""
    home = os.environ.get("GLMKIT_HOME")
    if home:
        return Path(home).expanduser() / "chat_history"
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "glmkit" / "chat_history"


def clean_text(text: str) -> str:
    """Text safe to encode as UTF-8 (for the history file, the tokenizer, JSON): bytes the terminal could not
    decode arrive as lone surrogates and become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return text.encode("utf-8", "replace").decode("utf-8")


def open_block(text: str) -> bool:
    """True while the text is a \"\"\" block that has not been closed yet (Enter then inserts a newline)."""
    body = text.lstrip()
    if not body.startswith(BLOCK):
        return False
    rest = body[len(BLOCK):]
    return not rest.rstrip().endswith(BLOCK)


def unwrap_block(text: str) -> str:
    """The message inside a \"\"\" block (the quotes removed); other text as typed."""
    body = text.strip()
    if body.startswith(BLOCK) and len(body) >= 2 * len(BLOCK) and body.endswith(BLOCK):
        return body[len(BLOCK):-len(BLOCK)].strip("\n")
    return text


class Prompt:
    """One prompt_toolkit session for the whole chat: `read(label)` returns a message or command text, raises
    KeyboardInterrupt on Ctrl-C and EOFError on Ctrl-D at an empty line."""

    def __init__(self, commands: list[str], use_history_file: bool = True):
        self.history, self.history_notice = _make_history(use_history_file)
        self._history_told = False
        self.session = PromptSession(history=self.history, key_bindings=_key_bindings(),
                                     prompt_continuation=lambda width, line, wrap: "." * (width - 1) + " ",
                                     completer=_CommandCompleter(commands), complete_while_typing=False)

    def read(self, label) -> str:
        return unwrap_block(clean_text(self.session.prompt(label)))

    def take_history_notice(self) -> str | None:
        """A one-time notice about the history file (could not be written), if there is news."""
        notice = self.history_notice or getattr(self.history, "failure", None)
        if notice is None or self._history_told:
            return None
        self._history_told = True
        return notice


def _make_history(use_file: bool):
    if not use_file:
        return InMemoryHistory(), None
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        return InMemoryHistory(), f"history is kept for this session only: cannot write {path} ({_reason(e)})"
    return SafeFileHistory(str(path)), None


def _reason(e: OSError) -> str:
    return e.strerror.lower() if e.strerror else type(e).__name__


class SafeFileHistory(FileHistory):
    """A FileHistory that survives a file that stops being writable (full disk, removed directory): the entry
    stays in memory and `failure` says why, for the chat loop to report once."""

    failure: str | None = None

    def store_string(self, string: str) -> None:
        try:
            super().store_string(clean_text(string))
        except OSError as e:
            if self.failure is None:
                self.failure = f"history is kept for this session only: cannot write {self.filename} ({_reason(e)})"


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")  # Alt-Enter reaches us as Esc then Enter
    def _newline(event):
        event.current_buffer.insert_text("\n")

    @kb.add("enter", filter=Condition(_current_text_in_open_block))
    def _block_newline(event):
        event.current_buffer.insert_text("\n")

    return kb


def _current_text_in_open_block() -> bool:
    return open_block(get_app().current_buffer.text)


class _CommandCompleter(Completer):
    """Tab completes a slash command's name (only the first word of a line that starts with /)."""

    def __init__(self, commands: list[str]):
        self.commands = sorted(commands)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or " " in text or "\n" in text:
            return
        for name in self.commands:
            if ("/" + name).startswith(text):
                yield Completion("/" + name, start_position=-len(text))
