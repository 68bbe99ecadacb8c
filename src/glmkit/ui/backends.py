"""Where the terminal chat's answers come from, behind one small interface:

- `LocalBackend`: a model loaded in this process (the LLM API's render and stream_chat).
- `RemoteBackend`: any OpenAI-compatible server (glmkit serve, vLLM, Ollama) over HTTP: streamed
  `POST {url}/chat/completions` read as server-sent events.

The interface is `Backend` below. `stream(messages, settings, tools, tool_choice)` raises ContextOverflow when
the conversation does not fit and BackendError for anything else the user can act on; closing its iterator early
aborts the request. With tools, the last chunk carries the answer's tool calls (the agent loop runs them).

Knows nothing of the screen, slash commands or how a conversation is trimmed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Iterator, Protocol
from urllib.parse import urlsplit

from ..chat.tool_calls import ToolCall
from ..engine.sampling_params import SamplingParams
from ..errors import ContextLengthError, GlmkitError, InvalidParameterError


@dataclass
class Chunk:
    text: str                       # new display text (may be empty)
    num_tokens: int = 0             # new tokens (an estimate over HTTP: one per streamed piece)
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk
    total_tokens: int | None = None   # the exact count when the source reports it (usage)
    tool_calls: list[ToolCall] = field(default_factory=list)  # on the last chunk: the calls the answer makes
    citations: list[dict] | None = None  # a knowledge base's passages (glmkit's `knowledge_base`), before the text


class BackendError(GlmkitError):
    """A one-line failure of the backend (unreachable server, refused key, server error)."""


class ContextOverflow(BackendError):
    """The conversation plus room for an answer does not fit the model's context."""


class Backend(Protocol):
    name: str                   # shown before each answer
    max_model_len: int | None   # None: unknown (a server's context is learned from its refusals)
    interruptible: bool         # may a KeyboardInterrupt land anywhere in `stream` (an HTTP read), or only
                                # between chunks (a local engine step must not be cut in half)?

    def count_tokens(self, messages: list[dict]) -> int | None:
        """The rendered conversation's prompt tokens; None when this backend cannot count them."""

    def stream(self, messages: list[dict], settings: dict, tools: list[dict] | None = None,
               tool_choice=None) -> Iterator[Chunk]:
        """The answer as it comes; `settings` holds SamplingParams fields; `tools` are OpenAI tool definitions
        (and `tool_choice` OpenAI's choice), whose calls come back on the last chunk."""

    def close(self) -> None:
        """Release connections (nothing for a local model)."""


class LocalBackend:
    interruptible = False  # a KeyboardInterrupt inside an engine step could leave its bookkeeping half done

    def __init__(self, llm, character: dict | None = None):
        self.llm, self.character = llm, character
        self.name = (character or {}).get("bot_name") or llm.model_config.name or llm.model_dir.name
        if llm.default_adapter:  # the answers come through it: say so wherever the name shows
            self.name += f" + {llm.default_adapter}"
        self.max_model_len = llm.engine.max_model_len

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.llm.render_chat(messages, character=self.character))

    def stream(self, messages: list[dict], settings: dict, tools: list[dict] | None = None,
               tool_choice=None) -> Iterator[Chunk]:
        pieces = self.llm.stream_chat(messages, SamplingParams(**settings), character=self.character, tools=tools,
                                      tool_choice=tool_choice)
        try:
            last = None  # the finishing chunk waits for the parse, which the generator returns
            while True:
                try:
                    piece, delta = next(pieces)
                except StopIteration as end:
                    if last is not None:
                        last.tool_calls = list(end.value[0].tool_calls) if tools else []
                        yield last
                    return
                chunk = Chunk(piece, len(delta.token_ids), delta.finish_reason)
                if delta.finished:
                    last = chunk
                else:
                    yield chunk
        except ContextLengthError as e:
            raise ContextOverflow(str(e)) from None
        except GlmkitError as e:  # e.g. a setting the engine refuses: one line, the session goes on
            raise BackendError(str(e)) from None
        finally:
            pieces.close()  # aborts the request if the caller stopped reading

    def close(self) -> None:
        pass


def api_base(url: str) -> str:
    """The API root the user means: `http://host:8000` and `http://host:8000/v1` both -> .../v1."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidParameterError("--url", url, "must be an http:// or https:// address, e.g. "
                                    "http://127.0.0.1:8000/v1")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or '/v1'}"


class RemoteBackend:
    interruptible = True  # closing the HTTP stream is how a server learns to abort

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 character: dict | None = None, connect_timeout_s: float = 10.0):
        self.base = api_base(url)
        httpx = _httpx()
        if not logging.getLogger().isEnabledFor(logging.DEBUG):  # a log line per request would mix with the chat
            logging.getLogger("httpx").setLevel(logging.WARNING)
        self.character = character
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: a busy server may take long before its first token; Ctrl-C is the way out.
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(connect_timeout_s, read=None))
        self.model = self._check_server(model)
        self.name = (character or {}).get("bot_name") or self.model
        self.max_model_len: int | None = None

    def count_tokens(self, messages: list[dict]) -> None:
        return None

    def close(self) -> None:
        self.client.close()

    def _check_server(self, model: str | None) -> str:
        """Reach the server before the first prompt (a wrong --url or key fails at once) and pick the model:
        --model, else the first `GET /models` lists. A server without /models is fine when --model is given."""
        try:
            r = self.client.get(self.base + "/models")
        except _httpx().HTTPError as e:
            raise self._connection_error(e) from None
        if r.status_code == 401 or (r.status_code != 200 and model is None):
            raise self._status_error(r.status_code, r.content)
        if model:
            return model
        try:
            return r.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"{self.base}/models lists no model; pass --model NAME") from None

    def stream(self, messages: list[dict], settings: dict, tools: list[dict] | None = None,
               tool_choice=None, extra: dict | None = None) -> Iterator[Chunk]:
        """`extra`: more body fields for a server that takes them (glmkit's `knowledge_base`)."""
        httpx = _httpx()
        body = {**self._body(messages, settings), **(extra or {})}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        try:
            with self.client.stream("POST", self.base + "/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise self._status_error(r.status_code, r.read())
                yield from _sse_chunks(r.iter_lines())
        except httpx.HTTPError as e:
            raise self._connection_error(e) from None

    def _body(self, messages: list[dict], settings: dict) -> dict:
        body = {"model": self.model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": settings["max_tokens"],
                "temperature": settings["temperature"], "top_p": settings["top_p"]}
        # Extensions many servers accept (vLLM, glmkit); sent only when they change something, so a strict
        # OpenAI-compatible server that rejects unknown fields still works with the defaults.
        if settings.get("top_k"):
            body["top_k"] = settings["top_k"]
        if settings.get("repetition_penalty", 1.0) != 1.0:
            body["repetition_penalty"] = settings["repetition_penalty"]
        if settings.get("seed") is not None:
            body["seed"] = settings["seed"]
        if self.character:
            body["character"] = self.character
        return body

    def _connection_error(self, e) -> BackendError:
        httpx = _httpx()
        if isinstance(e, httpx.ConnectError):
            reason = str(e).split("] ")[-1].lower() or "connection failed"
            return BackendError(f"cannot reach {self.base}: {reason}; is `glmkit serve` (or the server) running "
                                "there? check --url")
        if isinstance(e, httpx.TimeoutException):
            return BackendError(f"{self.base} did not answer in time ({type(e).__name__}); check --url")
        return BackendError(f"{self.base}: {type(e).__name__}: {e}")

    def _status_error(self, status: int, content: bytes) -> BackendError:
        message, code = error_fields(content)
        if code == "context_length_exceeded" or (status == 400 and "context" in message.lower()
                                                 and "length" in message.lower()):
            return ContextOverflow(message)
        if status == 401:
            return BackendError(f"{self.base} refused the API key (401): {message}; pass --api-key KEY")
        if code == "knowledge_base_not_found":  # the message names the knowledge bases there are
            return BackendError(f"{message} (404)")
        if status == 404:
            return BackendError(f"{self.base}: 404 {message}; check --url (it should end in /v1) and --model")
        return BackendError(f"{self.base} answered {status}: {message}")


def _httpx():
    """httpx, imported only for --url (a local chat does not need it)."""
    try:
        import httpx
    except ImportError:
        raise BackendError("--url needs the httpx package; install it with `pip install httpx`") from None
    return httpx


def error_fields(content: bytes) -> tuple[str, str | None]:
    """(message, code) of an OpenAI-shaped error body, or the body's first line."""
    try:
        error = json.loads(content)["error"]
        if isinstance(error, str):  # some servers (Ollama) send {"error": "..."}
            return error, None
        return str(error.get("message") or error), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        text = content.decode("utf-8", "replace").strip()
        return (text.splitlines() or ["(empty body)"])[0][:300], None


def _sse_chunks(lines) -> Iterator[Chunk]:
    """OpenAI chat-completion SSE lines -> Chunks (the first choice); an in-band error raises. Streamed
    `delta.tool_calls` pieces are joined by their index into the last chunk's calls."""
    finish, done = None, False
    calls: dict[int, dict] = {}
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            message, code = error_fields(json.dumps(event).encode())
            raise ContextOverflow(message) if code == "context_length_exceeded" else BackendError(message)
        if isinstance(event.get("citations"), list):  # glmkit's knowledge_base: the passages come first
            yield Chunk("", 0, citations=event["citations"])
        usage = event.get("usage")
        for choice in event.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece.get("index", 0), {"id": None, "name": "", "arguments": ""})
                function = piece.get("function") or {}
                call["id"] = piece.get("id") or call["id"]
                call["name"] += function.get("name") or ""
                call["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
            if text or choice.get("finish_reason"):
                yield Chunk(text, 1 if text else 0)
        if usage:
            yield Chunk("", 0, total_tokens=usage.get("completion_tokens"))
    if not done and finish is None:
        raise BackendError("the server closed the stream before the answer ended")
    tool_calls = [ToolCall(c["name"], c["arguments"] or "{}", *([c["id"]] if c["id"] else []))
                  for _, c in sorted(calls.items())]
    yield Chunk("", 0, finish or "stop", tool_calls=tool_calls)
