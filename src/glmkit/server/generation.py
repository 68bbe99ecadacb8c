"""Shared by the generation routes: request -> SamplingParams, and running one engine request to completion
or as a stream, aborting it when the client goes away."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.sampling_params import SamplingParams
from ..errors import ContextLengthError, GlmkitError
from .errors import from_glmkit


class EngineStream(StreamingResponse):
    """An SSE response that, however it ends (done, client gone, error), closes its generator (which aborts
    the engine request) and frees the request's queue slot."""

    def __init__(self, stream, on_close):
        super().__init__(stream, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream, self._on_close = stream, on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._stream.aclose()
            finally:
                self._on_close()


def sampling_params(req, llm, num_prompt_tokens: int, max_tokens: int | None, logprobs: int | None,
                    stop_token_ids: list[int] | None = None, prompt_field: str = "messages") -> SamplingParams:
    """The request's sampling fields; max_tokens is clamped to the room left in the context."""
    room = llm.engine.max_model_len - num_prompt_tokens
    if room <= 0:
        raise from_glmkit(ContextLengthError(num_prompt_tokens, llm.engine.max_model_len), prompt_field)
    kwargs = dict(n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                  top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
                  presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                  repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed, stop=req.stop,
                  ignore_eos=req.ignore_eos, max_tokens=min(max_tokens or room, room), logprobs=logprobs,
                  extra_stop_token_ids=list(stop_token_ids or []))
    try:
        return SamplingParams(**kwargs)
    except GlmkitError as e:
        raise from_glmkit(e)


async def collect(engine, prompt_ids: list[int], params: SamplingParams, request: Request) -> dict[int, dict]:
    """Run one request to the end; -> {choice index: {"ids", "text", "finish_reason", "logprobs", usage...}}.
    If the client disconnects first, the request is aborted."""
    request_id = uuid.uuid4().hex
    choices: dict[int, dict] = {}

    async def run():
        async for d in engine.generate(prompt_ids, params, request_id):
            c = choices.setdefault(d.index, {"ids": [], "text": "", "logprobs": [], "finish_reason": None})
            c["ids"] += d.token_ids
            c["text"] += d.text
            c["logprobs"] += d.logprobs or []
            if d.finished:
                c.update(finish_reason=d.finish_reason, num_prompt_tokens=d.num_prompt_tokens,
                         num_output_tokens=d.num_output_tokens, num_cached_tokens=d.num_cached_tokens)

    async def watch_disconnect():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    task, watcher = asyncio.ensure_future(run()), asyncio.ensure_future(watch_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the client left: leaving generate() aborts the request in the engine
    if task not in done:
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise asyncio.CancelledError()
    task.result()
    return choices


def total_usage(choices: dict[int, dict]) -> tuple[int, int, int]:
    first = next(iter(choices.values()))
    return (first.get("num_prompt_tokens", 0), sum(c.get("num_output_tokens", 0) for c in choices.values()),
            first.get("num_cached_tokens", 0))
