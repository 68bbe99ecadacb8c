"""One terminal chat session: takes a message, makes the conversation fit the context (dropping the oldest
turns, with a notice), streams the answer through a backend, marks answers that were cut or stopped, and
prints the optional stats line. Ctrl-C during an answer stops it (the request is aborted) and the session goes
on; no context problem ever ends the session.

Knows the backend interface (ui/backends.py), the Conversation and the Console; not prompt_toolkit, the
slash commands or command-line flags.
"""

from __future__ import annotations

import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .backends import Backend, BackendError, ContextOverflow
from .console import Console
from .conversation import Conversation


@dataclass
class Reply:
    text: str = ""
    finish_reason: str | None = None   # "stop" | "length" | "stopped" (Ctrl-C) | "error"
    num_tokens: int = 0                # every token of the answer (with tools: of all its generations)
    last_tokens: int | None = None     # with tools: those of the generation that ended it (for the cut mark)
    first_token_s: float | None = None
    elapsed_s: float = 0.0
    messages: list[dict] | None = None  # with tools: the conversation after this turn (calls, observations)


REMOTE_CONTEXT_GUESS = 4096  # a server's context for fitting passages, until it refuses a longer prompt


class StopRequest:
    """Set by the first Ctrl-C during an answer; the stream stops at its next chunk."""
    requested = False


@contextmanager
def stop_on_interrupt(raise_at_once: bool):
    """During an answer Ctrl-C means "stop this answer". With `raise_at_once` (an HTTP read, safe to break
    anywhere) it raises KeyboardInterrupt; otherwise the first Ctrl-C asks the stream to stop at the next chunk
    (an engine step is never cut in half) and only a second one raises."""
    stop = StopRequest()

    def handler(signum, frame):
        if raise_at_once or stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    def __init__(self, backend: Backend, console: Console, conversation: Conversation, settings: dict,
                 show_stats: bool, agent=None, knowledge=None):
        """`agent`: a tools.agent.Agent over the same backend; then each answer may call tools first.
        `knowledge`: (rag.service.Knowledge, knowledge base name): each answer comes from its passages."""
        self.backend, self.console, self.conversation = backend, console, conversation
        self.settings, self.show_stats, self.agent = settings, show_stats, agent
        self.knowledge = knowledge
        self.image_dir: Path | None = None  # where tool images are saved (kept after the session: paths were shown)
        self.num_images = 0

    def ask(self, text: str) -> Reply | None:
        """Answer one user message; None when it could not be sent (a one-line reason was printed)."""
        before = list(self.conversation.messages)  # what a refused message leaves, whatever was dropped trying
        self.conversation.add("user", text)
        if not self._fit_local(before):
            return None
        hits = None
        if self.knowledge is not None:
            hits = self._retrieve(before, text)
            if hits is None:
                return None
            if not hits:
                return self._not_found(text)
        num_dropped = 0
        while True:
            try:
                dropped = f"(dropped {_turns(num_dropped)} to fit the server's context)" if num_dropped else None
                if self.agent is not None:
                    reply = self._agent_reply(dropped)
                else:
                    reply = self._stream_reply(dropped, self._grounded(hits, text) if hits else None)
                break
            except ContextOverflow as e:
                # A server does not say its context size: learn it from the refusal, one turn at a time.
                if self.backend.max_model_len is None and self.conversation.drop_oldest_turn():
                    num_dropped += 1
                    continue
                self._refuse(before, f"this message does not fit the model's context: {e}")
                return None
            except BackendError as e:
                self._refuse(before, str(e))
                return None
        if reply.messages is not None:  # the turn's calls and observations stay in the conversation
            self.conversation.messages = [m for m in reply.messages if m["role"] != "system"]
        else:
            self.conversation.add("assistant", reply.text.strip())
        self._after(reply)
        if hits:
            self._sources(hits, reply.text)
        return reply

    def _retrieve(self, before: list[dict], text: str) -> list | None:
        """The knowledge base's passages for `text` ([] when none is relevant; None when the search failed)."""
        from ..errors import GlmkitError

        knowledge, name = self.knowledge
        try:
            with self.console.loading(f"searching {name}"):
                return knowledge.search(name, text)
        except GlmkitError as e:
            self._refuse(before, str(e))
            return None

    def _grounded(self, hits: list, text: str) -> list[dict]:
        """The conversation with the passages that fit in a system message before it."""
        from ..rag.answer import ground

        limit = self.backend.max_model_len or REMOTE_CONTEXT_GUESS
        room = limit - min(self.settings["max_tokens"] or limit, limit // 2)
        return ground(self.conversation.rendered(), hits, text, self.knowledge[0].count_tokens, room).messages

    def _not_found(self, text: str) -> Reply:
        """Nothing relevant in the documents: say so instead of letting the model invent an answer."""
        from ..rag.answer import NOT_FOUND, language

        reply = Reply(text=NOT_FOUND[language(text)], finish_reason="stop")
        self.console.answer_header(self.backend.name)
        self.console.write_answer(reply.text)
        self.console.write("\n")
        self.conversation.add("assistant", reply.text)
        return reply

    def _sources(self, hits: list, answer: str) -> None:
        """The passages the answer cites (all that were given when it cites none), one line each."""
        from ..rag.answer import citations

        given = citations(hits, answer)
        shown = [c for c in given if c["cited"]] or given
        for c in shown:
            place = c["source"] + (f" > {c['heading']}" if c["heading"] else "") + (f" (p. {c['page']})" if c["page"]
                                                                                   else "")
            self.console.notice(f"[{c['index']}] {place}")

    def _refuse(self, before: list[dict], message: str) -> None:
        self.conversation.messages = before
        self.console.warn(message)

    def _fit_local(self, before: list[dict]) -> bool:
        """Drop the oldest turns until the conversation plus room for an answer fits max_model_len. The room is
        max_tokens, but at most half the context, so a large max_tokens still leaves room to talk (a longer
        answer is cut by the context and marked so)."""
        limit = self.backend.max_model_len
        if limit is None:
            return True
        room = min(self.settings["max_tokens"] or limit, limit // 2)
        num_dropped = 0
        while (num_tokens := self.backend.count_tokens(self.conversation.rendered())) + room > limit:
            if not self.conversation.drop_oldest_turn():
                what = " with the system prompt" if self.conversation.system else ""
                self._refuse(before, f"this message does not fit the {limit}-token context ({num_tokens} tokens{what}, "
                             f"plus {room} for the answer); shorten it, /clear, or restart with a larger "
                             "--max-model-len")
                return False
            num_dropped += 1
        if num_dropped:
            self.console.notice(f"(dropped {_turns(num_dropped)} to fit the {limit}-token context)")
        return True

    def _stream_reply(self, notice: str | None = None, messages: list[dict] | None = None) -> Reply:
        """Stream one answer to the screen, `notice` just before it; `messages`: what to send instead of the
        conversation (it with a knowledge base's passages). Errors before the first text propagate (nothing was
        shown yet, so the caller may try again)."""
        view = _AnswerView(self.console, self.backend.name, notice)
        reply, start = Reply(), time.monotonic()
        stream = self.backend.stream(messages or self.conversation.rendered(), self.settings)
        try:
            with stop_on_interrupt(self.backend.interruptible) as stop, self.console.typeahead_hidden():
                try:
                    for chunk in stream:
                        if chunk.num_tokens and reply.first_token_s is None:
                            reply.first_token_s = time.monotonic() - start
                        reply.num_tokens = chunk.total_tokens or reply.num_tokens + chunk.num_tokens
                        reply.text += chunk.text
                        view.show(chunk.text)
                        reply.finish_reason = chunk.finish_reason or reply.finish_reason
                        if stop.requested:
                            reply.finish_reason = "stopped"
                            break
                except KeyboardInterrupt:
                    reply.finish_reason = "stopped"
                except BackendError as e:
                    if not view.started:
                        raise
                    reply.finish_reason = "error"
                    self.console.write("\n")
                    self.console.warn(str(e))
        finally:
            stream.close()
            view.stop_spinner()
        view.begin()
        reply.elapsed_s = time.monotonic() - start
        return reply

    def _agent_reply(self, notice: str | None = None) -> Reply:
        """As _stream_reply, through the agent: its text streams like an answer, each tool call and its
        observation show dimmed on their own lines, images are saved to files (paths printed). Ctrl-C stops
        the generation and interrupts a running cell."""
        from ..tools.agent import AgentError, Final, TextDelta, ToolFinished, ToolStarted

        view = _AnswerView(self.console, self.backend.name, notice)
        reply, start = Reply(), time.monotonic()
        self.agent.settings = dict(self.settings)  # /set applies to tool turns too
        events = self.agent.run(self.conversation.rendered())
        try:
            with stop_on_interrupt(self.backend.interruptible) as stop, self.console.typeahead_hidden():
                try:
                    for event in events:
                        if isinstance(event, TextDelta):
                            if reply.first_token_s is None:
                                reply.first_token_s = time.monotonic() - start
                            reply.text += event.text
                            view.show(event.text)
                        elif isinstance(event, ToolStarted):
                            view.begin()
                            self.console.write("\n")
                            self.console.tool_call(event.call.name, event.call.arguments)
                        elif isinstance(event, ToolFinished):
                            files = self._save_images(event.observation.images)
                            self.console.tool_result(event.observation.text, event.observation.error, event.seconds,
                                                     files)
                        elif isinstance(event, Final):
                            reply.finish_reason, reply.messages = event.finish_reason, event.messages
                            reply.num_tokens, reply.last_tokens = event.total_tokens, event.num_tokens
                        elif isinstance(event, AgentError):
                            if not view.started:
                                raise BackendError(event.message)
                            reply.finish_reason = "error"
                            self.console.write("\n")
                            self.console.warn(event.message)
                        if stop.requested and not reply.finish_reason:
                            self.agent.cancel()  # the agent ends the turn at its next step
                except KeyboardInterrupt:
                    self.agent.cancel()
                    reply.finish_reason = "stopped"
        finally:
            events.close()
            view.stop_spinner()
        view.begin()
        if reply.finish_reason == "stopped":
            reply.messages = None  # a stopped turn keeps only its text, as a plain answer does
        reply.elapsed_s = time.monotonic() - start
        return reply

    def _save_images(self, images) -> list[str]:
        """Tool images as PNG files in this session's own temporary folder (made on first use); their paths."""
        if not images:
            return []
        if self.image_dir is None:
            self.image_dir = Path(tempfile.mkdtemp(prefix="glmkit-images-"))
        paths = []
        for image in images:
            self.num_images += 1
            path = self.image_dir / f"image-{self.num_images}.png"
            path.write_bytes(image.png)
            paths.append(str(path))
        return paths

    def _after(self, reply: Reply) -> None:
        """The marks after an answer, its newline, and the stats line."""
        console = self.console
        if reply.finish_reason == "stopped":
            console.marker("[stopped]")
        elif reply.finish_reason == "length":
            num_tokens = reply.num_tokens if reply.last_tokens is None else reply.last_tokens
            by_max_tokens = num_tokens >= (self.settings["max_tokens"] or float("inf"))
            console.marker("[cut: max tokens reached]" if by_max_tokens else "[cut: context full]")
        if reply.finish_reason != "error":
            console.write("\n")
        if self.show_stats:
            console.notice(stats_line(reply))


def stats_line(reply: Reply) -> str:
    if reply.first_token_s is None:
        return f"[no tokens, {reply.elapsed_s:.2f}s]"
    decode_s = reply.elapsed_s - reply.first_token_s
    rate = (reply.num_tokens - 1) / decode_s if reply.num_tokens > 1 and decode_s > 0 else 0.0
    return f"[first token {reply.first_token_s:.2f}s, {reply.num_tokens} tokens, {rate:.1f} tok/s]"


def _turns(n: int) -> str:
    return f"{n} earlier turn{'s' if n != 1 else ''}"


class _AnswerView:
    """An answer on the screen: a spinner until the first text, then the notice (if any), the bot's name and
    the text as it comes."""

    def __init__(self, console: Console, name: str, notice: str | None):
        self.console, self.name, self.notice = console, name, notice
        self.spinner = console.start_spinner()
        self.started = False

    def show(self, text: str) -> None:
        if text:
            self.begin()
            self.console.write_answer(text)

    def begin(self) -> None:
        if self.started:
            return
        self.started = True
        self.spinner.stop()
        if self.notice:
            self.console.notice(self.notice)
        self.console.answer_header(self.name)

    def stop_spinner(self) -> None:
        self.spinner.stop()
