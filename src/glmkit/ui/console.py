"""What the terminal chat writes, and how: answers on stdout, notices (dimmed) and warnings, colour that turns
itself off when stdout is not a terminal or NO_COLOR is set, and a spinner on stderr for silent waits.

In an interactive session notices go to stdout with the answers, so they stay in order on the screen; over a
pipe stdout carries only the answers and every notice goes to stderr. Knows nothing of models, backends or the
conversation: it is handed strings.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager

try:
    import termios
except ImportError:  # not POSIX: typed-ahead keys are echoed as the console does
    termios = None

RESET, BOLD_GREEN, BOLD_CYAN, DIM, YELLOW = "\033[0m", "\033[1;32m", "\033[1;36m", "\033[2m", "\033[33m"
FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
FRAME_S = 0.1
# Model text shown on a terminal must not drive it: an ESC or CR in an answer would move the cursor, recolour or
# retitle the window. Such characters show as U+FFFD on screen (the conversation keeps the text as generated).
CONTROLS = {c: "\ufffd" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A)}


def wants_colour(stream) -> bool:
    """https://no-color.org: any non-empty NO_COLOR turns colour off; so does output that is not a terminal."""
    return not os.environ.get("NO_COLOR") and _isatty(stream)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Console:
    def __init__(self, interactive: bool, out=None, err=None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.interactive = interactive
        self.colour = interactive and wants_colour(self.out)
        # Spinners only where a person watches stderr: never over a pipe, never into a log file.
        self.spinners = interactive and _isatty(self.err)

    def paint(self, text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if self.colour else text

    # -- answers ---------------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def write_answer(self, text: str) -> None:
        self.write(text.translate(CONTROLS) if self.interactive else text)

    def answer_header(self, name: str) -> None:
        """The bot's name before an answer (interactive only: over a pipe only the answers are printed)."""
        if self.interactive:
            self.write("\n" + self.paint(name, BOLD_CYAN) + "：")

    def marker(self, text: str) -> None:
        """A mark after an answer, e.g. [stopped]: on the answer's line when a person reads it, else stderr."""
        if self.interactive:
            self.write(" " + self.paint(text, DIM))
        else:
            self._line(self.err, text)

    # -- tools -----------------------------------------------------------------------------------------
    def tool_call(self, name: str, arguments: str) -> None:
        """A call the model made, before it runs: `⚙ name(arguments)`, dimmed, on its own line."""
        self._tool_line(f"⚙ {name}({_short(arguments, 300)})")

    def tool_result(self, text: str, error: bool, seconds: float, files: list[str]) -> None:
        """What the call gave back, boxed by a bar on the left, at most a few lines; saved images by path."""
        lines = _short(text, 600).splitlines()[:8] or ["(no output)"]
        head = f"{'✗ failed' if error else '→'} ({seconds:.1f}s)"
        body = "\n".join("│ " + line for line in lines)
        saved = "".join(f"\n│ image saved: {path}" for path in files)
        self._tool_line(f"{head}\n{body}{saved}", YELLOW if error else DIM)

    def _tool_line(self, text: str, code: str = DIM) -> None:
        stream = self.out if self.interactive else self.err
        self._line(stream, self.paint(text.translate(CONTROLS), code) if self.interactive else text)

    # -- notices ---------------------------------------------------------------------------------------
    def notice(self, text: str) -> None:
        """Something the user should see but that is not an answer (dimmed)."""
        if self.interactive:
            self._line(self.out, self.paint(text, DIM))
        else:
            self._line(self.err, text)

    def warn(self, text: str) -> None:
        """A one-line problem the session survives: a bad /set value, a file that cannot be read."""
        if self.interactive:
            self._line(self.out, self.paint(text, YELLOW))
        else:
            self._line(self.err, f"glmkit: {text}")

    @staticmethod
    def _line(stream, text: str) -> None:
        stream.write(text + "\n")
        stream.flush()

    @contextmanager
    def typeahead_hidden(self, stdin=None):
        """While an answer streams, keys typed ahead are not echoed into it (they still reach the next
        prompt, which shows them); Ctrl-C still interrupts. A no-op unless stdin is a terminal."""
        saved = None
        if self.interactive and termios is not None:
            try:
                fd = (stdin or sys.stdin).fileno()
                saved = termios.tcgetattr(fd)
            except (AttributeError, ValueError, OSError, termios.error):  # not a terminal after all
                saved = None
        if saved is None:
            yield
            return
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO  # lflags
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        try:
            yield
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, saved)

    # -- waiting ---------------------------------------------------------------------------------------
    def start_spinner(self, label: str | None = None):
        """A spinner on stderr until `.stop()`: with a label on a line of its own (loading), without one at
        the cursor (waiting for an answer's first text). A no-op object where no one watches stderr."""
        if not self.spinners:
            return _NoSpinner()
        spinner = Spinner(self.err, label)
        spinner.start()
        return spinner

    @contextmanager
    def loading(self, label: str):
        """The spinner during start-up, with stderr log lines (and progress bars) written around it: the
        spinner hides while someone else writes and comes back once they have been quiet for a moment. Keys
        typed meanwhile are not echoed over it; they wait for the first prompt."""
        with self.typeahead_hidden():
            spinner = self.start_spinner(label)
            if isinstance(spinner, _NoSpinner):
                yield
                return
            shared = _SpinnerAwareStream(self.err, spinner)
            swapped = _swap_log_streams(self.err, shared)
            real_stderr, sys.stderr = sys.stderr, shared
            try:
                yield
            finally:
                sys.stderr = real_stderr
                for handler, stream in swapped:
                    handler.setStream(stream)
                spinner.stop()


class _NoSpinner:
    def stop(self) -> None:
        pass


class Spinner:
    def __init__(self, stream, label: str | None):
        self.stream, self.label = stream, label
        self.lock = threading.Lock()
        self.quiet_until = 0.0     # another writer was active: stay hidden until then
        self.drawn = False
        self.needs_newline = False  # another writer left its cursor mid-line (a progress bar)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="glmkit-spinner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and erase it; calling it again does nothing."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        with self.lock:
            self.erase()

    def _run(self) -> None:
        for frame in itertools.cycle(FRAMES):
            if self._done.wait(FRAME_S):
                return
            with self.lock:
                if time.monotonic() >= self.quiet_until:
                    self._draw(frame)

    def _draw(self, frame: str) -> None:
        if self.label is None:
            self.stream.write(frame + "\b")  # the cursor stays where the answer's text will start
        else:
            if self.needs_newline:
                self.stream.write("\n")
                self.needs_newline = False
            self.stream.write(f"\r{frame} {self.label}\033[K")
        self.stream.flush()
        self.drawn = True

    def erase(self) -> None:
        """Remove the spinner from the screen (the caller holds the lock)."""
        if self.drawn:
            self.stream.write(" \b" if self.label is None else "\r\033[K")
            self.stream.flush()
            self.drawn = False


class _SpinnerAwareStream:
    """stderr as seen by log handlers and progress bars while the loading spinner runs."""

    def __init__(self, stream, spinner: Spinner):
        self._stream, self._spinner = stream, spinner

    def write(self, text: str) -> int:
        with self._spinner.lock:
            self._spinner.erase()
            self._spinner.quiet_until = time.monotonic() + 1.0
            written = self._stream.write(text)
            if text:
                self._spinner.needs_newline = not text.endswith("\n")
        return written

    def __getattr__(self, name):  # flush, isatty, fileno, encoding: as the real stream
        return getattr(self._stream, name)


def _swap_log_streams(old, new) -> list:
    """Point the logging handlers that write to `old` at `new`; returns what to restore."""
    swapped = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is old:
            swapped.append((handler, handler.setStream(new)))
    return swapped


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
