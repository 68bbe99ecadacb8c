"""POST /v1/completions: raw prompts (text or token ids, one or many) -> completions, or an SSE stream."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request

from ..errors import GlmkitError
from . import streaming as sse
from .errors import APIError, error_responses, from_glmkit
from .generation import admitted_stream, collect, sampling_params
from .limits import check_prompt_size
from .protocol import Completion, CompletionRequest
from .state import Work

router = APIRouter()


def _prompts(req: CompletionRequest, client) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    elif p and all(isinstance(x, int) for x in p):
        p = [p]
    if not p:
        raise APIError(400, "prompt is empty; give a string, a list of strings or token ids", param="prompt")
    check_prompt_size([x for x in p if isinstance(x, str)], client, "prompt")
    return p


def _logprobs(tokenizer, entries) -> dict:
    return {"tokens": [tokenizer.decode([t], skip_special_tokens=False) for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{tokenizer.decode([a], skip_special_tokens=False): alp for a, alp in top}
                             for _, _, top in entries], "text_offset": []}


@router.post("/v1/completions", responses={
    200: {"model": Completion, "description": "The completions; with `stream: true` an SSE stream of chunks"},
    **error_responses(400, 404, 408, 413, 429, 503)})
async def completions(req: CompletionRequest, request: Request):
    state = request.app.state.glmkit
    client, adapter_id = state.resolve_model(req.model)
    try:  # tokenizing is CPU work: off the event loop
        prompts = await asyncio.to_thread(lambda: [client.encode_prompt(x) for x in _prompts(req, client)])
    except GlmkitError as e:
        raise from_glmkit(e, "prompt")
    params = [sampling_params(req, client, len(p), req.max_tokens, req.logprobs, adapter_id) for p in prompts]
    for p, sp in zip(prompts, params):  # reject bad prompts with a 400 before anything runs or streams
        try:
            client.validate(p, sp)
        except GlmkitError as e:
            raise from_glmkit(e, "prompt")
    work = Work.of(prompts, params, req.n)
    request_id, created = sse.random_id("cmpl-"), sse.now()
    if req.stream:
        return admitted_stream(state, _stream(client, req, prompts, params, request_id, created), work)
    admission = state.admit(work)
    try:
        results = await asyncio.gather(*(collect(client, p, sp, request) for p, sp in zip(prompts, params)))
    finally:
        admission.release()
    choices, prompt_tokens, completion_tokens = [], 0, 0
    tokenizer = client.tokenizer
    for k, result in enumerate(results):
        prompt_tokens += len(result.prompt_token_ids)
        completion_tokens += result.num_output_tokens
        echo = tokenizer.decode(result.prompt_token_ids) if req.echo else ""
        for c in result.outputs:
            choices.append({"index": k * req.n + c.index, "text": echo + c.text, "finish_reason": c.finish_reason,
                            "logprobs": _logprobs(tokenizer, c.logprobs or []) if req.logprobs is not None else None})
    return {"id": request_id, "object": "text_completion", "created": created, "model": req.model,
            "system_fingerprint": "glmkit", "choices": choices, "usage": sse.usage(prompt_tokens, completion_tokens)}


async def _stream(client, req, prompts, params, request_id, created):
    queue: asyncio.Queue = asyncio.Queue()
    usage = {"prompt": sum(len(p) for p in prompts), "completion": 0}

    async def pump(k, prompt, sp):
        try:
            async for d in client.generate(prompt, sp, uuid.uuid4().hex):
                await queue.put((k, d))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.ensure_future(pump(k, p, sp)) for k, (p, sp) in enumerate(zip(prompts, params))]
    try:
        remaining = len(tasks)
        while remaining:
            k, d = await queue.get()
            if d is None:
                remaining -= 1
                continue
            if d.finished:
                usage["completion"] += d.num_output_tokens
            if d.text or d.finished:
                choice = {"index": k * req.n + d.index, "text": d.text, "finish_reason": d.finish_reason,
                          "logprobs": _logprobs(client.tokenizer, d.logprobs) if req.logprobs is not None and d.logprobs else None}
                yield sse.sse({"id": request_id, "object": "text_completion", "created": created, "model": req.model,
                               "system_fingerprint": "glmkit", "choices": [choice]})
        for t in tasks:
            t.result()
        if req.stream_options and req.stream_options.include_usage:
            yield sse.sse({"id": request_id, "object": "text_completion", "created": created, "model": req.model,
                           "choices": [], "usage": sse.usage(usage["prompt"], usage["completion"])})
        yield sse.DONE
    except Exception as e:  # noqa: BLE001 - the stream has started; report in-band and end it
        yield sse.error_event(e)
    finally:
        for t in tasks:
            t.cancel()
