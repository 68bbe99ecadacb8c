"""What every HTTP request passes through before a route: the drain gate (503 while shutting down), the API key
check, the request id (`X-Request-Id`), the HTTP counters of /metrics (also per model: the route notes the model
name on the request's record) and one access-log line when it ends.

A plain ASGI middleware, not @app.middleware("http"): that wrapper hides client disconnects from
request.is_disconnected(), and a request whose client left must be aborted. Token counts reach the access log
through `TallyingClient`, which wraps the engine client and adds up what each request's generate() calls saw
(found through a context variable, so routes need not pass anything along). Knows nothing of the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from .errors import RequestTimedOut, error_response, is_anthropic_path

access_log = logging.getLogger("glmkit.access")

PROBE_PATHS = {"/health", "/ready"}            # never need a key; answered while draining; logged at DEBUG only
DRAIN_EXEMPT = PROBE_PATHS | {"/metrics"}      # answered while draining: watching a drain is not new work
DOC_PATHS = {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}  # open only with --open-docs
MAX_REQUEST_ID = 128


@dataclass(eq=False)
class RequestRecord:
    """One HTTP request as the access log reports it."""
    request_id: str
    method: str
    path: str
    start: float = field(default_factory=time.monotonic)
    status: int = 500
    prompt_tokens: int | None = None      # prompt tokens sent to the engine (None: no generation)
    completion_tokens: int | None = None  # tokens the engine generated for it
    abort: str | None = None              # "client_disconnected" | "shutdown" | "request_timeout"
    model: str | None = None              # the model (served name or adapter) a generating request resolved to
    done: bool = False                    # the last byte of the response is on its way

    def count_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens = (self.prompt_tokens or 0) + num_tokens
        self.completion_tokens = self.completion_tokens or 0

    def count_completion(self, num_tokens: int) -> None:
        self.completion_tokens = (self.completion_tokens or 0) + num_tokens


current_request: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("glmkit_request",
                                                                                       default=None)


def request_id_of(headers: dict) -> str:
    """The client's X-Request-Id when it is sane (printable ASCII, at most 128 characters), else a new one."""
    raw = headers.get(b"x-request-id", b"").strip()
    if 0 < len(raw) <= MAX_REQUEST_ID and all(0x20 <= b < 0x7F for b in raw):
        return raw.decode("ascii")
    return uuid.uuid4().hex


class RequestGate:
    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        record = RequestRecord(request_id_of(headers), scope["method"], scope["path"])
        id_header = (b"x-request-id", record.request_id.encode("ascii"))

        async def send_noted(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record.done = True
            try:
                await send(message)
            except OSError:  # the client is gone (ASGI spec 2.4 servers say so here)
                record.abort = record.abort or "client_disconnected"
                raise

        async def receive_noted():
            message = await receive()
            if message["type"] == "http.disconnect" and not record.done:
                record.abort = record.abort or "client_disconnected"
            return message

        path, token = scope["path"], current_request.set(record)
        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, send_noted)
                return
            # The web page's own long-lived event streams are not work a drain waits for
            tracked = path not in DRAIN_EXEMPT and not self._is_page(path)
            if tracked:
                self.state.active.add(record)
            try:
                await self.app(scope, receive_noted, send_noted)
            finally:
                self.state.active.discard(record)
        finally:
            current_request.reset(token)
            if record.status == 499:
                record.abort = record.abort or "client_disconnected"
            self._count(scope, record)

    def _refusal(self, scope, headers: dict):
        """The response that turns the request away (draining, no key), or None to let it through."""
        path, state = scope["path"], self.state
        if state.draining and path not in DRAIN_EXEMPT:
            return error_response(path, 503, "the server is shutting down and takes no new requests; retry "
                                  "shortly (another instance may answer)", "server_error", None,
                                  "server_shutting_down", {"Retry-After": "5", "Connection": "close"})
        keys = state.settings.api_keys
        if not keys or path in PROBE_PATHS or scope["method"] == "OPTIONS" or self._is_page(path):
            return None  # the page asks for a key at its own login, and sends it with each API request
        if state.settings.open_docs and path in DOC_PATHS:
            return None
        header = headers.get(b"authorization", b"").decode("latin-1")
        # Anthropic's clients send the key as `x-api-key`; either header is accepted on every route.
        token = (header[7:].strip() if header.lower().startswith("bearer ")
                 else headers.get(b"x-api-key", b"").decode("latin-1").strip())
        if any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            return None
        how = "`x-api-key: <key>`" if is_anthropic_path(path) else "`Authorization: Bearer <key>`"
        return error_response(path, 401, f"missing or invalid API key; send {how}", "authentication_error", None,
                              "invalid_api_key")

    def _is_page(self, path: str) -> bool:
        page = self.state.settings.ui_path
        return page is not None and (path == page or path.startswith(page + "/"))

    def _count(self, scope, record: RequestRecord) -> None:
        route = getattr(scope.get("route"), "path", None)
        elapsed = time.monotonic() - record.start
        if self._is_page(record.path):  # its assets, events and heartbeats: one metrics row, debug log lines
            route = self.state.settings.ui_path
        key, requests, seconds = route or "other", self.state.http_requests, self.state.http_seconds
        requests[(key, record.status)] = requests.get((key, record.status), 0) + 1
        seconds[key] = seconds.get(key, 0.0) + elapsed
        if record.model is not None and record.prompt_tokens is not None:  # it reached the engine
            self.state.count_model_use(record.model, record.prompt_tokens, record.completion_tokens)
        if self.state.settings.access_log:
            log_access(record, route or record.path, elapsed, quiet=self._is_page(record.path))


def _logfmt(value) -> str:
    text = str(value)
    if text and all(c.isprintable() and c not in ' "=\\' for c in text):
        return text
    return json.dumps(text)


def log_access(record: RequestRecord, route: str, elapsed_s: float, quiet: bool = False) -> None:
    """One line per request, `key=value` pairs (values quoted when they need it); the same fields ride on the
    log record as `access` for a structured handler."""
    fields = {"method": record.method, "route": route, "status": record.status,
              "duration_ms": round(elapsed_s * 1000, 1), "request_id": record.request_id}
    if record.model is not None:
        fields["model"] = record.model
    if record.prompt_tokens is not None:
        fields["prompt_tokens"], fields["completion_tokens"] = record.prompt_tokens, record.completion_tokens
    if record.abort:
        fields["abort"] = record.abort
    level = logging.DEBUG if quiet or record.path in PROBE_PATHS else logging.INFO
    if access_log.isEnabledFor(level):
        access_log.log(level, " ".join(f"{k}={_logfmt(v)}" for k, v in fields.items()), extra={"access": fields})


class TallyingClient:
    """An engine client that adds each generate() call's prompt and generated tokens to the current request's
    record and ends a request that runs past `request_timeout_s` (counted from its arrival) with
    RequestTimedOut; everything else passes straight through."""

    def __init__(self, client, request_timeout_s: float | None = None):
        self._client, self.request_timeout_s = client, request_timeout_s

    def __getattr__(self, name):
        return getattr(self._client, name)

    async def generate(self, prompt_ids, params, request_id=None):
        record = current_request.get()
        if record is not None:
            record.count_prompt(len(prompt_ids))
        deadline = record.start + self.request_timeout_s if record is not None and self.request_timeout_s else None
        deltas = self._client.generate(prompt_ids, params, request_id)
        async with contextlib.aclosing(deltas):  # leaving early closes the engine stream now (it aborts)
            while True:
                try:
                    if deadline is None:
                        delta = await anext(deltas)
                    else:  # a timeout cancels the wait inside the engine stream, which aborts the request
                        delta = await asyncio.wait_for(anext(deltas), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    record.abort = record.abort or "request_timeout"
                    raise RequestTimedOut(self.request_timeout_s) from None
                if record is not None:
                    record.count_completion(len(delta.token_ids))
                yield delta
