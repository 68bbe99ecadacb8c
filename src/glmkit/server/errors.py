"""Every failure as OpenAI's `{"error": {"message", "type", "param", "code"}}` with the right status; on
Anthropic's routes (/v1/messages...) as Anthropic's `{"type": "error", "error": {"type", "message"}}` instead.

User mistakes (pydantic validation, glmkit's typed errors) become 4xx that name the field, value and limit;
anything else is a 500 with a generic message, logged in full. Knows nothing of the engine.
"""

from __future__ import annotations

import functools
import logging
from typing import Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.routing import Match

from ..errors import ContextLengthError, GlmkitError, InvalidParameterError, excerpt

log = logging.getLogger("glmkit")


class ServerShuttingDown(Exception):
    """The server shut down while this request ran: the engine aborted it after the drain timeout."""


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class RequestTimedOut(APIError):
    """The request ran past --request-timeout; the engine has aborted it. Clients are told not to retry
    (`x-should-retry: false`, which the openai and anthropic SDKs honour): the same request would time out again."""

    def __init__(self, timeout_s: float):
        super().__init__(408, f"the request ran longer than {timeout_s:g}s (--request-timeout) and was aborted; "
                         "ask for fewer tokens (max_tokens) or raise the server's limit", "timeout_error",
                         code="request_timeout", headers={"x-should-retry": "false"})


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, on every route but Anthropic's."""
    error: ErrorObject


class AnthropicErrorObject(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error body, on /v1/messages...."""
    type: Literal["error"]
    error: AnthropicErrorObject


_ERROR_DESCRIPTIONS = {
    400: "The request is invalid: the error names the field (`param`), the value and the limit",
    401: "Missing or invalid API key",
    404: "The model, the adapter or the stored response is not here",
    408: "The request body did not arrive within --read-timeout, or the generation ran past --request-timeout",
    409: "The adapter still runs requests; retry when they have finished",
    413: "The request body is larger than --max-body-size",
    429: "The server is full (--max-queue); retry after `Retry-After` seconds",
    503: "The model is loading or failed to load, the engine stopped, or the server is shutting down",
}


def error_responses(*statuses: int, anthropic: bool = False) -> dict:
    """The OpenAPI `responses` entries of these error statuses, each with the error model its route answers."""
    model = AnthropicErrorResponse if anthropic else ErrorResponse
    return {status: {"model": model, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ANTHROPIC_PATH = "/v1/messages"
# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); other 4xx: invalid_request_error.
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                    529: "overloaded_error"}


def is_anthropic_path(path: str) -> bool:
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def anthropic_error_body(status: int, message: str) -> dict:
    type_ = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": type_, "message": message}}


def error_response(path: str, status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The error in the shape of the API the path belongs to: Anthropic's on /v1/messages..., else OpenAI's."""
    body = anthropic_error_body(status, message) if is_anthropic_path(path) else error_body(message, type_, param,
                                                                                            code)
    return JSONResponse(body, status_code=status, headers=headers)


def from_glmkit(e: GlmkitError, param: str | None = None) -> APIError:
    if isinstance(e, ContextLengthError):
        message = str(e) if param != "prompt" else str(e).replace("shorten the messages", "shorten the prompt")
        return APIError(400, message, param=param or "messages", code="context_length_exceeded")
    if isinstance(e, InvalidParameterError):
        return APIError(400, str(e), param=e.field, code="invalid_value")
    return APIError(400, str(e))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


@functools.cache
def _model_tags() -> frozenset[str]:
    """The names of the request models: pydantic tags a union member's errors with its model's name."""
    names, todo = set(), [BaseModel]
    while todo:
        for model in todo.pop().__subclasses__():
            todo.append(model)
            if model.__module__.startswith("glmkit.server."):
                names.add(model.__name__)
    return frozenset(names)


def _field(loc) -> str:
    # pydantic adds union-member tags (e.g. "str", "list[int]", "TextFormat") to the location; they are not
    # field names.
    parts = [str(p) for p in loc if p != "body" and not _is_tag(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _is_tag(part) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part or part in _model_tags())


_MISMATCHES = ("literal_error", "union_tag_not_found", "union_tag_invalid")


def _mismatch(error: dict) -> bool:
    """The error only says that the value is not of one of a union's types."""
    loc = error.get("loc", ())
    return bool(loc) and _is_tag(loc[-1]) and (error["type"].endswith("_type") or error["type"] in _MISMATCHES)


def _openai_error(errors: list) -> dict:
    """The first error; but when it only says that the value is not of a union's first type (a list is not a
    string) and another type fits as far as a field inside it (an input item's role), that field's error."""
    first = errors[0]
    if _mismatch(first):
        base = tuple(first["loc"][:-1])
        for error in errors[1:]:
            loc = tuple(error.get("loc", ()))
            if loc[:len(base)] == base and not _mismatch(error) and any(
                    isinstance(p, str) and not _is_tag(p) for p in loc[len(base):]):
                return error
    return first


_ANTHROPIC_BLOCK_TAGS = {"text", "tool_use", "tool_result"}


def _anthropic_error(errors: list) -> tuple[dict, tuple]:
    """The most specific error (content blocks are a union: a block's own error beats "not a string") and its
    location without the block-type tags pydantic adds after a list index."""
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = list(first.get("loc", ()))
    loc = [p for i, p in enumerate(loc) if not (p in _ANTHROPIC_BLOCK_TAGS and i and isinstance(loc[i - 1], int))]
    return first, tuple(loc)


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    if is_anthropic_path(request.url.path):
        first, loc = _anthropic_error(exc.errors())
    else:
        first = _openai_error(exc.errors())
        loc = first.get("loc", ())
    field = _field(loc)
    value = first.get("input")
    shown = excerpt(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 120 else type(value).__name__
    message = f"{field}={shown}: {first.get('msg', 'invalid value')}"
    if first.get("type") == "missing":
        message = f"{field} is required"
    elif first.get("type") == "json_invalid":
        message, field = "the request body is not valid JSON", None
    return error_response(request.url.path, 400, message, "invalid_request_error", field, "invalid_value")


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(request.url.path, exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def glmkit_error_handler(request: Request, exc: GlmkitError) -> JSONResponse:
    return await api_error_handler(request, from_glmkit(exc))


FASTAPI_BODY_ERROR = "There was an error parsing the body"


async def http_error_handler(request: Request, exc) -> JSONResponse:
    """Routing failures (an unknown path, a wrong method) in OpenAI's shape instead of FastAPI's {"detail"}."""
    headers = getattr(exc, "headers", None)
    if exc.status_code == 404:
        message, type_, code = (f"no route {request.method} {request.url.path}; the API is described at "
                                "/openapi.json"), "not_found_error", "not_found"
    elif exc.status_code == 405:
        message, type_, code = (f"{request.method} is not allowed on {request.url.path}", "invalid_request_error",
                                "method_not_allowed")
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    elif exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:  # e.g. bytes that are not UTF-8
        message, type_, code = ("the request body is not valid JSON: send a JSON object encoded as UTF-8",
                                "invalid_request_error", "invalid_json")
    else:
        message, type_, code = str(exc.detail), "invalid_request_error", None
    return error_response(request.url.path, exc.status_code, message, type_, None, code, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path: Starlette's 405 names only the first route's (GET of
    /v1/responses/{id}, not its DELETE), and RFC 9110 wants all of them in `Allow`."""
    methods = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route_methods
    return sorted(methods)


async def disconnected_handler(request: Request, exc: Exception) -> Response:
    """A client that left is routine, not an error: one quiet line, no traceback. 499 (nginx's "client closed
    request") goes nowhere, but the request counters see it."""
    log.info("glmkit: the client of %s %s left; its request was aborted", request.method, request.url.path)
    return Response(status_code=499)


async def unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(request.url.path, 500, "internal server error; see the server log", "server_error", None,
                          "internal_error")
