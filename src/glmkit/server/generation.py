"""Shared by the generation routes: request -> SamplingParams, and running one engine request to completion
(a RequestOutput) or as a stream, aborting it when the client goes away. Talks to an EngineClient only."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine.outputs import OutputCollector, RequestOutput
from ..engine.sampling_params import SamplingParams
from ..errors import ContextLengthError, GlmkitError
from .engine_client import EngineClient
from .errors import from_glmkit
from .state import Work


class ClientDisconnected(Exception):
    """The client left before its (non-streamed) answer was ready; the request has been aborted."""


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


def request_params(req, max_tokens: int | None, logprobs: int | None, adapter_id: int | None) -> SamplingParams:
    """The request's sampling fields as SamplingParams (max_tokens None: until the context is full), run by the
    adapter `adapter_id` (None: the base model)."""
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos,
            max_tokens=max_tokens, logprobs=logprobs, adapter_id=adapter_id)
    except GlmkitError as e:
        raise from_glmkit(e)


def sampling_params(req, client: EngineClient, num_prompt_tokens: int, max_tokens: int | None,
                    logprobs: int | None, adapter_id: int | None) -> SamplingParams:
    """A raw completion's sampling fields; max_tokens is clamped to the room left in the context."""
    room = client.max_model_len - num_prompt_tokens
    if room <= 0:
        raise from_glmkit(ContextLengthError(num_prompt_tokens, client.max_model_len), "prompt")
    return replace(request_params(req, max_tokens, logprobs, adapter_id), max_tokens=min(max_tokens or room, room))


def admitted_stream(state, stream, work: Work) -> EngineStream:
    """The SSE response over `stream` once the request's work is admitted (a 429 otherwise); the queue share
    is given back when the stream ends, however it ends."""
    return EngineStream(stream, state.admit(work).release)


async def admitted_collect(state, request: Request, prompt_ids: list[int], params: SamplingParams,
                           n: int = 1) -> RequestOutput:
    """`collect` once the request's work is admitted (a 429 otherwise), giving the queue share back after."""
    admission = state.admit(Work.of([prompt_ids], params, n))
    try:
        return await collect(state.client, prompt_ids, params, request)
    finally:
        admission.release()


async def collect(client: EngineClient, prompt_ids: list[int], params: SamplingParams,
                  request: Request) -> RequestOutput:
    """Run one request to the end. If the client disconnects first, the request is aborted."""
    request_id = uuid.uuid4().hex
    collector = OutputCollector(request_id, prompt_ids, params.n)

    async def run():
        async for d in client.generate(prompt_ids, params, request_id):
            collector.add(d)

    await unless_client_leaves(request, run())  # leaving generate() aborts the request in the engine
    return collector.result()


async def unless_client_leaves(request: Request, work):
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)

    async def watch_disconnect():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch_disconnect())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise ClientDisconnected()
    return task.result()
