"""The pieces of incremental display text: each turns a stream of ids or text into what a chat UI may append,
at O(1) amortized work per id, by keeping only a bounded unsettled tail instead of re-reading the whole text.

- `TextDecoder`: ids -> text, holding back ids that end inside a UTF-8 character.
- `SpanFilter`: rewrites markers (ChatGLM's [[训练时间]] -> 2023年) and drops hidden spans (Qwen's
  <tool_call> blocks), holding back a tail that may still become a marker or an opening.
- `EdgeTrim`: `str.strip()` for a stream: leading whitespace never shows, trailing whitespace waits for more.
- `CallGate`: with tools declared, holds the whole answer while its start may still be a tool call.

Each piece is pure text bookkeeping. `chat/serving.py` chains them per output segment; this module knows
nothing of chat formats, tools lists, parsing or the engine.
"""

from __future__ import annotations

import re

REPLACEMENT_CHAR = "\ufffd"
# A valid character's bytes span at most 4 ids, so more ids than this in a row that still end inside a
# character are invalid bytes: they are shown as U+FFFD (as the final text shows them) instead of held.
MAX_HELD_IDS = 8


class TextDecoder:
    """ids -> text deltas whose concatenation equals `decode(all ids)`.

    Each step decodes a window that starts at the ids of the previous step (their text gives the new ids
    their context: leading spaces, merged bytes), never the whole output. Ids after the last point where the
    text ends on a whole character are held back, at most MAX_HELD_IDS of them.
    """

    def __init__(self, decode):
        self._decode = decode
        self._window: list[int] = []   # context ids (already shown) + held ids + new ids
        self._num_context = 0
        self._context_len: int | None = None  # len(decode(context)), cached until the window moves

    @property
    def num_held_ids(self) -> int:
        return len(self._window) - self._num_context

    def add(self, ids: list[int], final: bool = False) -> str:
        """Append ids; return the newly settled text (all of it when final)."""
        self._window.extend(ids)
        end = len(self._window)
        if end == self._num_context:
            return ""
        if self._context_len is None:
            self._context_len = len(self._decode(self._window[:self._num_context])) if self._num_context else 0
        if final:
            return self._advance(end, self._decode(self._window))
        # The latest cut that ends on a whole character; with bytes of one character spread over several ids,
        # the text before them still shows at once.
        for cut in range(end, max(self._num_context, end - MAX_HELD_IDS), -1):
            text = self._decode(self._window[:cut])
            if len(text) > self._context_len and not text.endswith(REPLACEMENT_CHAR):
                return self._advance(cut, text)
        if end - self._num_context > MAX_HELD_IDS:
            return self._advance(end, self._decode(self._window))
        return ""

    def _advance(self, cut: int, text: str) -> str:
        new = text[self._context_len:]
        # The ids shown in this step become the next window's context.
        self._window = self._window[self._num_context:]
        self._num_context = cut - self._num_context
        self._context_len = None
        return new


class SpanFilter:
    """Rewrites markers and drops hidden spans in streamed text, leftmost first, as `str.replace` and a
    left-to-right scan for `opening ... closing` would on the whole text.

    A span is judged once closed: `hides(span text)` False (e.g. a <tool_call> block that is not a readable
    call, which the final parse keeps as text) shows it after all; a span still open stays hidden. Outside
    spans only a tail that may still complete a marker or an opening is held, and each character is looked
    at a bounded number of times. Markers and openings must not overlap one another.
    """

    def __init__(self, replacements: tuple[tuple[str, str], ...] = (),
                 hidden_spans: tuple[tuple[str, str], ...] = (), hides=lambda span: True):
        self._replacements = dict(replacements)
        self._closings = dict(hidden_spans)  # opening -> closing
        self._hides = hides
        self._openings = tuple(self._replacements) + tuple(self._closings)
        first_chars = "".join(sorted({o[0] for o in self._openings}))
        self._candidate = re.compile(f"[{re.escape(first_chars)}]") if first_chars else None
        self._held = ""        # outside spans: a possible partial marker or opening
        self._opening: str | None = None  # inside a span: its opening; the span's text so far:
        self._span: list[str] = []
        self._span_len = 0
        self._span_tail = ""   # its last characters, where a closing may have begun

    @property
    def num_held_chars(self) -> int:
        return len(self._held) + self._span_len

    def push(self, text: str) -> str:
        if self._candidate is None:
            return text
        text, self._held = self._held + text, ""
        out, pos = [], 0
        while pos is not None and pos < len(text):
            if self._opening is not None:
                pos = self._in_span(text, pos, out)
                continue
            match = self._candidate.search(text, pos)
            if match is None:
                out.append(text[pos:])
                break
            start = match.start()
            out.append(text[pos:start])
            opening = next((o for o in self._openings if text.startswith(o, start)), None)
            if opening in self._replacements:
                out.append(self._replacements[opening])
            elif opening is not None:
                self._opening = opening
            elif self._may_open(text, start):
                self._held = text[start:]
                break
            else:
                opening = text[start]  # not a candidate after all: one character of plain text
                out.append(opening)
            pos = start + len(opening)
        return "".join(out)

    def _may_open(self, text: str, start: int) -> bool:
        rest = len(text) - start
        return any(rest < len(o) and o.startswith(text[start:]) for o in self._openings)

    def _in_span(self, text: str, pos: int, out: list[str]) -> int | None:
        """Inside a span: the position after its closing (the span judged), or None if it goes on."""
        closing = self._closings[self._opening]
        tail = self._span_tail
        bridge = (tail + text[pos:pos + len(closing) - 1]).find(closing) if tail else -1
        if 0 <= bridge < len(tail):  # the closing began in earlier text
            body = "".join(self._span)[:bridge - len(tail)]
            end = pos + len(closing) - (len(tail) - bridge)
        else:
            found = text.find(closing, pos)
            if found < 0:
                self._span.append(text[pos:])
                self._span_len += len(text) - pos
                keep = len(closing) - 1
                self._span_tail = (tail + text[max(pos, len(text) - keep):])[-keep:] if keep else ""
                return None
            body, end = "".join(self._span) + text[pos:found], found + len(closing)
        span = self._opening + body + closing
        if not self._hides(span):
            out.append(span)
        self._opening, self._span, self._span_len, self._span_tail = None, [], 0, ""
        return end

    def close(self) -> str:
        """The run of text has ended: a partial marker is plain text after all; an open span stays hidden."""
        held, self._held = self._held, ""
        return "" if self._opening is not None else held


class EdgeTrim:
    """`str.strip()` for streamed text: leading whitespace is dropped, trailing whitespace is held until more
    visible text follows (and dropped if none does)."""

    def __init__(self):
        self.started = False  # a visible character has been shown
        self._trailing: list[str] = []
        self.num_held_chars = 0

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self._trailing.append(text)
            self.num_held_chars += len(text)
            return ""
        out = "".join(self._trailing) + body
        tail = text[len(body):]
        self._trailing, self.num_held_chars = [tail], len(tail)
        return out


class CallGate:
    """With tools declared: while the text shown so far may still be the start of a tool call written as
    text (JSON, a fence, a tag), hold it; once its start rules that out, release it and pass everything on.
    A start that is a call's opening holds the rest of the answer (the final parse decides about it)."""

    def __init__(self, call_starts: tuple[str, ...]):
        self._starts = call_starts
        self._longest = max(len(s) for s in call_starts)
        self._head = ""          # held text while undecided: a proper prefix of some start (bounded)
        self._decided: str | None = None  # "text" or "call"

    @property
    def num_held_chars(self) -> int:
        return len(self._head)

    def push(self, text: str) -> str:
        if self._decided == "text":
            return text
        if self._decided == "call":
            return ""
        # Leading whitespace cannot decide anything (and the display never starts with it).
        head = self._head = (self._head + text).lstrip()
        if any(head.startswith(s) for s in self._starts):
            self._decided, self._head = "call", ""
            return ""
        if not head or (len(head) < self._longest and any(s.startswith(head) for s in self._starts)):
            return ""
        self._decided, self._head = "text", ""
        return head


class StopCut:
    """Ends the shown text before the first stop string, where the engine stopped the generation (it matches
    stop strings on text, which can end inside a token, so the ids decode past them); until the end, holds back
    a tail that may be the start of one. Each character is looked at a bounded number of times."""

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._keep = max(map(len, self._stops), default=1) - 1
        self._held = ""
        self.done = False

    @property
    def num_held_chars(self) -> int:
        return len(self._held)

    def push(self, text: str) -> str:
        if self.done:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        cut = cut_at_stop(buffer, self._stops)
        if len(cut) < len(buffer):
            self.done, self._held = True, ""
            return cut
        split = max(len(buffer) - self._keep, 0)
        self._held = buffer[split:]
        return buffer[:split]


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to the first occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(hits)] if hits else text
