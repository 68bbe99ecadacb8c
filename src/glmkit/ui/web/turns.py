"""What the web page shows for a conversation, and one answer turn as the page streams it.

A conversation is kept as OpenAI chat messages (what the server is sent), each optionally carrying display
extras under the key "glmkit" (images a tool made, seconds a call took, the answer's token figures); `display`
turns them into Gradio's message dicts: user and assistant text, each tool call as a collapsible step holding
its arguments (code as a python fence) and its observation, images after it. `api_messages` strips the extras
before a request. `Turn` runs one answer through the agent (tools/agent.py) and keeps both views up to date
as events arrive. Knows nothing of Gradio's components, HTTP routes or the engine.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

EXTRAS = "glmkit"


def api_messages(messages: list[dict]) -> list[dict]:
    """The messages as the server takes them: display extras removed."""
    return [{k: v for k, v in m.items() if k != EXTRAS} for m in messages]


def call_text(name: str, arguments: str) -> str:
    """A call's arguments for the page: code as a python fence, else JSON."""
    try:
        args = json.loads(arguments)
    except ValueError:
        return f"```\n{arguments}\n```"
    if isinstance(args, dict) and set(args) == {"code"} and isinstance(args["code"], str):
        return f"```python\n{args['code']}\n```"
    return f"```json\n{json.dumps(args, ensure_ascii=False, indent=2)}\n```"


def observation_text(text: str, error: bool) -> str:
    fence = "```text\n" + text.replace("```", "ʼʼʼ") + "\n```"
    return ("**error**\n" if error else "**→**\n") + fence


@dataclass
class Shown:
    """The page's view: Gradio message dicts, and for each the index of the conversation message it shows
    (the user messages' indices are what edit and retry need)."""
    messages: list[dict] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)

    def add(self, message: dict, source: int) -> dict:
        self.messages.append(message)
        self.sources.append(source)
        return message


def display(messages: list[dict]) -> Shown:
    shown, steps, question = Shown(), {}, ""
    for i, m in enumerate(messages):
        extras = m.get(EXTRAS) or {}
        if m["role"] == "user":
            question = _text(m["content"])
            shown.add({"role": "user", "content": question}, i)
        elif m["role"] == "assistant":
            if m.get("content"):
                shown.add({"role": "assistant", "content": _text(m["content"])}, i)
            if extras.get("citations"):  # a knowledge base's passages, under the answer
                shown.add({"role": "assistant", "content": sources_text(extras["citations"], _text(m.get("content"))),
                           "metadata": {"title": sources_title(extras["citations"], question), "status": "done"}},
                          i)
            for call in m.get("tool_calls") or []:
                function = call["function"]
                steps[call["id"]] = shown.add({"role": "assistant", "content": call_text(function["name"],
                                                                                      function["arguments"]),
                                               "metadata": {"title": f"⚙ {function['name']}", "id": call["id"],
                                                            "status": "pending"}}, i)
        elif m["role"] == "tool":
            step = steps.get(m.get("tool_call_id"))
            if step is not None:
                step["content"] += "\n\n" + observation_text(_text(m["content"]), bool(extras.get("error")))
                step["metadata"]["status"] = "done"
                if extras.get("seconds") is not None:
                    step["metadata"]["duration"] = round(float(extras["seconds"]), 2)
            for path in extras.get("images", []):
                shown.add({"role": "assistant", "content": {"path": path, "mime_type": "image/png"}}, i)
    return shown


_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>#|~])")


def sources_title(citations: list[dict], question: str) -> str:
    """The Sources block's title, naming the files (the block opens on a click), in the question's language
    (as the server picks its "not found" sentence)."""
    files = ", ".join(dict.fromkeys(_escape(str(c.get("source") or "?")) for c in citations))
    return f"来源：{files}" if _CJK.search(question or "") else f"Sources: {files}"


def sources_text(citations: list[dict], answer: str) -> str:
    """Each passage as `[n] source > heading (p. N)` and its text quoted; the ones the answer cites ([n])
    marked. A streamed answer's citations do not say which are cited (the answer came after them)."""
    blocks = []
    for c in citations:
        n = c.get("index", len(blocks) + 1)
        place = str(c.get("source") or "?") + (f" > {c['heading']}" if c.get("heading") else "")
        place += f" (p. {c['page']})" if c.get("page") else ""
        cited = c.get("cited") or f"[{n}]" in (answer or "")
        quoted = "\n".join("> " + _escape(line) for line in str(c.get("text") or "").splitlines())
        blocks.append(f"**[{n}] {_escape(place)}**{' ✓' if cited else ''}\n\n{quoted}")
    return "\n\n".join(blocks)


def _escape(text: str) -> str:
    """A document's words shown as written, not as Markdown or HTML."""
    return _MARKDOWN.sub(r"\\\1", text)


def _text(content) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


@dataclass
class Figures:
    """An answer's token figures, shown under the chat."""
    num_tokens: int = 0
    first_token_s: float | None = None
    elapsed_s: float = 0.0
    finish_reason: str | None = None

    def line(self) -> str:
        """While the answer streams: tokens so far; when it has ended: tokens, speed, first token, how it ended."""
        if self.first_token_s is None:
            return ""
        if self.finish_reason is None:
            return f"{self.num_tokens} tokens · first token {self.first_token_s:.2f} s …"
        decode_s = self.elapsed_s - self.first_token_s
        rate = (self.num_tokens - 1) / decode_s if self.num_tokens > 1 and decode_s > 0 else 0.0
        mark = {"length": " · cut: max tokens", "stopped": " · stopped", "error": " · error"}.get(
            self.finish_reason, "")
        return (f"{self.num_tokens} tokens · {rate:.1f} tokens/s · first token {self.first_token_s:.2f} s"
                f"{mark}")


class Turn:
    """One answer: feed it the agent's events; `messages` is the conversation with what has arrived so far
    (the partial answer included), `shown()` the page's view of it."""

    def __init__(self, messages: list[dict], save_image):
        """`save_image(png bytes) -> path` keeps a tool's image where the page can serve it."""
        self.before = list(messages)
        self.done: list[dict] = []        # this turn's finished messages (calls, observations)
        self.text = ""                    # the answer being written
        self.figures = Figures()
        self.error: str | None = None
        self._save_image = save_image
        self._start = time.monotonic()
        self._calls: dict[str, dict] = {}
        self.citations: list[dict] = []   # a knowledge base's passages the answer was given

    def cite(self, citations: list[dict]) -> None:
        """The passages the server retrieved for this answer (Knowledge mode): kept with the answer."""
        self.citations = list(citations)

    @property
    def messages(self) -> list[dict]:
        tail = [{"role": "assistant", "content": self.text}] if self.text or not self.done else []
        extras = {"citations": self.citations} if self.citations else {}
        if self.figures.finish_reason is not None:
            extras.update(tokens=self.figures.num_tokens, line=self.figures.line())
        if extras and tail:
            tail[0][EXTRAS] = extras
        return self.before + self.done + tail

    def shown(self) -> list[dict]:
        return display(self.messages).messages

    def feed(self, event) -> None:
        from ...tools.agent import AgentError, Final, TextDelta, ToolFinished, ToolStarted

        if isinstance(event, TextDelta):
            if self.figures.first_token_s is None:
                self.figures.first_token_s = time.monotonic() - self._start
            self.figures.num_tokens += event.num_tokens
            self.text += event.text
        elif isinstance(event, ToolStarted):
            if self.figures.first_token_s is None:  # the call's tokens were the answer's first
                self.figures.first_token_s = time.monotonic() - self._start
            call = event.call
            if self.text or not self.done or self.done[-1]["role"] != "assistant":
                self.done.append({"role": "assistant", "content": self.text or None, "tool_calls": []})
                self.text = ""
            self.done[-1]["tool_calls"].append({"id": call.id, "type": "function",
                                                "function": {"name": call.name, "arguments": call.arguments}})
        elif isinstance(event, ToolFinished):
            extras = {"seconds": event.seconds, "error": event.observation.error,
                      "images": [str(self._save_image(image.png)) for image in event.observation.images]}
            message = {"role": "tool", "tool_call_id": event.call.id, "name": event.call.name,
                       "content": event.observation.text, EXTRAS: extras}
            self.done.append(message)
        elif isinstance(event, Final):
            self.figures.num_tokens = event.total_tokens or self.figures.num_tokens
            self.figures.finish_reason = event.finish_reason or "stop"
            self.text = event.text
        elif isinstance(event, AgentError):
            self.error = event.message
            self.figures.finish_reason = "error"
        self.figures.elapsed_s = time.monotonic() - self._start
