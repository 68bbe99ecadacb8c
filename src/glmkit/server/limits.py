"""What one request may ask of the server, checked before any expensive work, so that one client cannot stall
the others: the body's size and how long it may take to arrive (`BodyLimit`, an ASGI middleware that answers
413 / 408 before the route runs), and a prompt's size, bounded from its text alone before it is tokenized
(`check_prompt_size`). Per-request counts (tools, stop strings, prompts, n) are limits of the request models in
protocol.py, so the OpenAPI schema states them; sequences in flight are admitted in state.py.

Knows nothing of the engine beyond the client's `max_model_len` and `max_token_bytes`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .errors import APIError, error_response

MiB = 1 << 20


@dataclass
class Limits:
    max_body_bytes: int = 8 * MiB           # --max-body-size; a larger body is a 413
    read_timeout_s: float = 30.0            # --read-timeout: headers, and then the body, must arrive within this
    max_connections: int = 1024             # --max-connections: more open connections are answered 503 and closed
    request_timeout_s: float | None = None  # --request-timeout: a generation running longer is aborted (None: never)


class BodyLimit:
    """Reads a request's body before the route does: at most `max_body_bytes` (413 at once when Content-Length
    says more, or as soon as more has arrived), within `read_timeout_s` (408), then hands it to the route.
    After the body, the route's receive() reaches the connection again (client disconnects)."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        limit, path = self.limits.max_body_bytes, scope["path"]
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, receive, send, f"the request body has {int(declared)} bytes")
        try:
            body = await asyncio.wait_for(self._read(receive, limit), self.limits.read_timeout_s)
        except asyncio.TimeoutError:
            response = error_response(path, 408, f"the request body did not arrive within "
                                      f"{self.limits.read_timeout_s:g}s (--read-timeout)", "invalid_request_error",
                                      None, "request_timeout", {"Connection": "close"})
            return await response(scope, receive, send)
        except _TooLarge:
            return await self._too_large(scope, receive, send, f"the request body has more than {limit} bytes")
        except _Gone:
            return None  # the client left while sending; nobody to answer
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, scope, receive, send, what: str):
        response = error_response(
            scope["path"], 413, f"{what}; this server accepts at most {self.limits.max_body_bytes} "
            "(--max-body-size); send less, e.g. fewer or shorter messages", "invalid_request_error", None,
            "request_too_large", {"Connection": "close"})  # the rest of the body is not read
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class _Gone(Exception):
    pass


# Text a tokenizer may fold before it splits: Unicode normalization can map a 3-byte character to a 1-byte one,
# and runs of whitespace can collapse; so whitespace is not counted and each token may cover this many times its
# own bytes.
NORMALIZATION_SLACK = 4
_WHITESPACE = " \t\n\r"


def text_bytes(value) -> int:
    """UTF-8 bytes of every string inside `value` (dicts' values, lists' items; keys are not counted), whitespace
    left out."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass")) - sum(value.count(c) for c in _WHITESPACE)
    if isinstance(value, dict):
        return sum(text_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(text_bytes(v) for v in value)
    return 0


SAMPLE_CHARS = 8192      # characters of each sample a large prompt's density is measured on
SAMPLED_ABOVE = 1 << 20  # text bytes beyond which the estimate below is made


def check_prompt_size(value, client, field: str) -> None:
    """A 400 when the text in `value` (messages, tools, a prompt) cannot fit the context, found without
    tokenizing it all. First a bound: a token covers at most `client.max_token_bytes` bytes (times the slack
    above), so the text has at least that many tokens. Then, for large text, an estimate: three samples of its
    longest string (start, middle, end) are tokenized, and the text is refused when even at the sparsest
    sample's bytes per token it would need more than twice the context. Anything let through is tokenized and
    checked exactly later. (Tokenizing holds the GIL for stretches: megabytes of it stall every request.)"""
    size = text_bytes(value)
    least = size // (client.max_token_bytes * NORMALIZATION_SLACK)
    if least >= client.max_model_len:
        raise _too_long(field, f"{size} bytes of text, at least {least} tokens", client.max_model_len)
    if size <= SAMPLED_ABOVE:
        return
    longest = max(_strings(value), key=len)
    middle = max(0, len(longest) // 2 - SAMPLE_CHARS // 2)
    samples = [longest[:SAMPLE_CHARS], longest[middle:middle + SAMPLE_CHARS], longest[-SAMPLE_CHARS:]]
    bytes_per_token = max(text_bytes(t) / max(1, len(client.tokenizer.encode(t))) for t in samples)
    estimate = int(size / max(bytes_per_token, 1e-3))
    if estimate > 2 * client.max_model_len:
        raise _too_long(field, f"{size} bytes of text, about {estimate} tokens (estimated from samples)",
                        client.max_model_len)


def _too_long(field: str, what: str, max_model_len: int) -> APIError:
    return APIError(400, f"{field} has {what}, but the model accepts {max_model_len} (max_model_len); shorten the "
                    f"{field}", param=field, code="context_length_exceeded")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
