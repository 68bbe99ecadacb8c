"""Server-sent events and OpenAI response pieces (ids, chunks, usage, logprobs). Pure functions."""

from __future__ import annotations

import json
import secrets
import string
import time

from ..errors import GlmkitError
from .errors import APIError, ServerShuttingDown, from_glmkit

_ALPHABET = string.ascii_letters + string.digits


def stream_error(e: Exception) -> APIError:
    """What ended a stream that had started, as the error a request would have got before it started: the
    caller writes it in its API's in-band shape (its status line is long gone)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, GlmkitError):
        return from_glmkit(e)
    if isinstance(e, ServerShuttingDown):
        return APIError(503, str(e), "server_error", code="server_shutting_down")
    return APIError(500, f"generation failed: {e}", "server_error", code="internal_error")


def error_event(e: Exception) -> str:
    """The in-band end of an OpenAI stream that failed after it started."""
    err = stream_error(e)
    return sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})


def random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def chat_chunk(request_id: str, model: str, created: int, choices: list[dict], usage_: dict | None = None) -> dict:
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": "glmkit", "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def now() -> int:
    return int(time.time())


def token_logprob(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer, entries) -> dict:
    """Engine logprob entries [(id, logprob, [(alt id, alt logprob)...])] -> OpenAI chat `logprobs`."""
    content = []
    for token_id, logprob, top in entries:
        item = token_logprob(tokenizer, token_id, logprob)
        item["top_logprobs"] = [token_logprob(tokenizer, t, lp) for t, lp in top]
        content.append(item)
    return {"content": content}


def tool_call_dicts(calls) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
