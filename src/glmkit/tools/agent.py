"""The agent loop: the model answers, the tools it calls run, their observations go back, until the model
answers without a call. After `max_rounds` rounds of calls, or when the model only repeats calls it already made
this turn (small models go round in circles), one last round asks for the answer in words, without tools.

    agent = Agent(llm_or_url, tools=[get_weather], code_interpreter=True)
    for event in agent.run(messages): ...   # TextDelta, ToolStarted, ToolFinished, Final, AgentError

It drives any ui.backends Backend: a model in this process (`LLM`) or any OpenAI-compatible server (a URL), so
the same loop runs in the terminal, the web page and scripts. Calls are parsed by the chat layer (never `eval`:
model output reaches Python only inside the code interpreter's kernel) and checked against each tool's schema
before the call (tools/registry.py); several calls of one answer run in parallel. Closing the event iterator
(or `cancel()`) aborts the generation and interrupts a running cell.

Observations go back as OpenAI `tool` messages; each chat format renders them as its own observation turn.
ChatGLM3 writes code for its interpreter as a call named `interpreter`: it runs as the `python` tool.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterator

from ..chat.tool_calls import ToolCall, leading_bare_json_tool_calls
from ..ui.backends import Backend, BackendError
from .base import Closeable, Observation
from .registry import Toolbox

ALIASES = {"interpreter": "python"}  # ChatGLM3's name for its code interpreter
ANSWER_NOW = {"role": "system", "content": "Answer the user's last message now, in words, from the tool results "
                                           "above. Do not call a tool."}
DEFAULT_SETTINGS = {"max_tokens": 1024, "temperature": 0.8, "top_p": 0.8}


@dataclass
class TextDelta:
    text: str
    num_tokens: int = 0


@dataclass
class ToolStarted:
    call: ToolCall


@dataclass
class ToolFinished:
    call: ToolCall
    observation: Observation
    seconds: float


@dataclass
class Final:
    text: str
    finish_reason: str | None
    messages: list[dict] = field(default_factory=list)  # the conversation with this turn's calls and answer
    num_tokens: int = 0    # tokens of the last generation (the one `finish_reason` is about)
    total_tokens: int = 0  # tokens of every generation of the turn


@dataclass
class AgentError:
    message: str


Event = TextDelta | ToolStarted | ToolFinished | Final | AgentError


class Agent(Closeable):
    def __init__(self, model, tools=(), *, code_interpreter=False, max_rounds: int = 5,
                 settings: dict | None = None, api_key: str | None = None, model_name: str | None = None):
        """`model`: an LLM, a Backend, or the URL of an OpenAI-compatible server (`api_key`, `model_name` for
        it). `tools`: Tools, @tool functions or plain typed functions. `code_interpreter`: True for a private kernel of this
        agent, or a KernelSession to use."""
        self.backend = _backend(model, api_key, model_name)
        self.tools = Toolbox(tools)
        self._kernel, self._own_kernel = None, False
        if code_interpreter:
            from .kernel import KernelSession, python_tool

            self._own_kernel = code_interpreter is True
            self._kernel = KernelSession() if self._own_kernel else code_interpreter
            self.tools.add(python_tool(self._kernel))
        self.max_rounds = max_rounds
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._cancelled = False

    def run(self, messages: list[dict]) -> Iterator[Event]:
        """One user turn: events until the final answer. `messages` is not changed; Final.messages is the
        conversation with this turn's assistant calls, observations and answer appended."""
        self._cancelled = False
        messages = list(messages)
        specs = self.tools.specs() or None
        made: set[tuple[str, str]] = set()  # the calls run this turn
        names = set(self.tools.names()) | {alias for alias, name in ALIASES.items() if name in self.tools}
        last_round, total = False, 0
        for round_ in range(self.max_rounds + 1):
            last_round = last_round or round_ == self.max_rounds
            # The last round answers in words: no tools, and (after calls) a note saying so, without which a
            # small model goes on writing calls as text
            sent = messages + [ANSWER_NOW] if last_round and made else messages
            text, finish, calls, num_tokens = "", None, [], 0
            stream = self.backend.stream(sent, self.settings, tools=None if last_round else specs)
            try:
                shown = 0  # characters of `text` given out as TextDeltas
                for chunk in stream:
                    num_tokens = chunk.total_tokens or num_tokens + chunk.num_tokens
                    text += chunk.text
                    # After a round of calls, a reply that starts like JSON may be calls written as text (below):
                    # held until the round ends, so calls never show as words
                    if chunk.text and not (made and text.lstrip().startswith(("{", "["))):
                        yield TextDelta(text[shown:], chunk.num_tokens)
                        shown = len(text)
                    finish = chunk.finish_reason or finish
                    calls = chunk.tool_calls or calls
                    if self._cancelled:
                        finish = "stopped"
                        break
            except BackendError as e:
                yield AgentError(str(e))
                return
            finally:
                stream.close()
            total += num_tokens
            if made and specs and not last_round and not calls and not self._cancelled:
                # After a round of calls, a small model may write its next calls as bare JSON text (one after
                # another, the last often cut by max_tokens): they are calls, so rounds and the guard apply
                calls, rest = leading_bare_json_tool_calls(text, names)
                if calls:  # what follows them is words, or one more call cut short (dropped)
                    text = "" if rest.lstrip().startswith(("{", "[")) else rest.strip()
            elif finish == "length":
                calls = []  # a reply cut short ends the turn: its calls may be cut too
            if text[shown:]:  # what was held back, now known to be words
                yield TextDelta(text[shown:], 0)
            if not calls or self._cancelled:
                messages.append({"role": "assistant", "content": text})
                yield Final(text, finish, messages, num_tokens, total)
                return
            keys = {(c.name, _canonical(c.arguments)) for c in calls}
            if keys <= made:  # only calls already answered: a model going round in circles; answer now
                last_round = True
                continue
            made |= keys
            messages.append(_assistant(text, calls))
            for event in self._run_calls(calls):
                yield event
                if isinstance(event, ToolFinished):
                    messages.append(_observation_message(event.call, event.observation))

    def _run_calls(self, calls: list[ToolCall]) -> Iterator[Event]:
        for call in calls:
            yield ToolStarted(call)
        if len(calls) == 1:
            yield self._run_call(calls[0])
            return
        with ThreadPoolExecutor(max_workers=min(8, len(calls))) as pool:
            futures = [pool.submit(self._run_call, c) for c in calls]
            done = {id(f.result().call): f.result() for f in as_completed(futures)}
        for call in calls:  # in the model's order, so observations line up with its calls
            yield done[id(call)]

    def _run_call(self, call: ToolCall) -> ToolFinished:
        start = time.monotonic()
        name = call.name if call.name in self.tools else ALIASES.get(call.name, call.name)
        observation = self.tools.call(name, call.arguments)
        return ToolFinished(call, observation, time.monotonic() - start)

    def cancel(self) -> None:
        """Stop the current turn: the generation ends at its next chunk, a running cell is interrupted."""
        self._cancelled = True
        if self._kernel is not None:
            self._kernel.interrupt()

    def close(self) -> None:
        if self._own_kernel and self._kernel is not None:
            self._kernel.close()
        self.backend.close()


def _canonical(arguments: str) -> str:
    """A call's arguments in one spelling (key order and spacing aside), to see a call made twice."""
    try:
        return json.dumps(json.loads(arguments), sort_keys=True, ensure_ascii=False)
    except ValueError:
        return arguments


def _assistant(text: str, calls: list[ToolCall]) -> dict:
    return {"role": "assistant", "content": text or None,
            "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                           for c in calls]}


def _observation_message(call: ToolCall, observation: Observation) -> dict:
    text = observation.text
    if observation.images:  # the pictures go to the user; the model learns that they were shown
        text += "".join(f"\n[image {i + 1} shown to the user{': ' + im.alt if im.alt else ''}]"
                        for i, im in enumerate(observation.images))
    return {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text}


def _backend(model, api_key: str | None, model_name: str | None) -> Backend:
    from ..ui.backends import LocalBackend, RemoteBackend

    if isinstance(model, str):
        return RemoteBackend(model, api_key=api_key, model=model_name)
    if hasattr(model, "stream_chat"):
        return LocalBackend(model)
    return model


__all__ = ["Agent", "AgentError", "Event", "Final", "TextDelta", "ToolFinished", "ToolStarted"]
