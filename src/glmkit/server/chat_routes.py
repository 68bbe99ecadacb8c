"""POST /v1/chat/completions: messages (+ tools, + CharacterGLM profile) -> one answer or an SSE stream, with
tool calls returned as OpenAI `tool_calls` (also streamed as `delta.tool_calls`)."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Request
from pydantic import BaseModel

from ..errors import GlmkitError
from . import knowledge, streaming as sse
from .errors import error_responses, from_glmkit
from .generation import admitted_collect, admitted_stream, request_params
from .limits import check_prompt_size
from .protocol import ChatCompletion, ChatCompletionRequest
from .state import Work

router = APIRouter()


def _tool_request(req: ChatCompletionRequest):
    """(tools, tool choice, whether OpenAI's older `functions` API was used, the field that names the choice),
    with `functions` / `function_call` translated into tools and a tool choice."""
    choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, BaseModel) else req.tool_choice
    if req.tools is not None and not isinstance(req.tools, list):
        # the ChatGLM3 demo server's shape (one tool, or the composite demo's {name: definition, ...}); its
        # clients read `function_call` replies
        tools = req.tools.model_dump(exclude_none=True) if isinstance(req.tools, BaseModel) else {
            name: definition.model_dump(exclude_none=True) for name, definition in req.tools.items()}
        return tools, choice, True, "tool_choice"
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    legacy = False
    if tools is None and req.functions:
        tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions]
        fc = req.function_call
        choice = {"type": "function", "function": fc.model_dump()} if isinstance(fc, BaseModel) else fc
        legacy = True
    legacy_field = legacy or (req.function_call is not None and req.tool_choice is None)
    return tools, choice, legacy, "function_call" if legacy_field else "tool_choice"


def _response_format(req: ChatCompletionRequest) -> dict | None:
    if req.response_format is None:
        return None
    return req.response_format.model_dump(exclude_none=True, by_alias=True)


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        out.append(d)
    return out


def _finish_reason(reason: str | None, calls, legacy: bool) -> str | None:
    """OpenAI's reason: a call when the answer is one, unless max_tokens cut the output (then "length", as
    OpenAI reports a call cut short; its arguments may be incomplete)."""
    if calls and reason != "length":
        return "function_call" if legacy else "tool_calls"
    return "stop" if reason == "abort" else reason


# The model name ChatGLM3's demo clients send; their replies also carry the first call as `function_call`.
CHATGLM3_DEMO_MODEL = "chatglm3-6b"


def _message(parsed, legacy: bool, mirror_call: bool = False) -> dict:
    message = {"role": "assistant", "content": parsed.content if parsed.content or not parsed.tool_calls else None}
    if parsed.tool_calls:
        if legacy:
            call = parsed.tool_calls[0]
            message["function_call"] = {"name": call.name, "arguments": call.arguments}
        else:
            message["tool_calls"] = sse.tool_call_dicts(parsed.tool_calls)
            if mirror_call:  # ChatGLM3's demo clients read the first call from `function_call`
                first = parsed.tool_calls[0]
                message["function_call"] = {"name": first.name, "arguments": first.arguments}
    return message


@router.post("/v1/chat/completions", responses={
    200: {"model": ChatCompletion, "description": "The answer; with `stream: true` an SSE stream of chunks"},
    **error_responses(400, 404, 408, 413, 429, 503)})
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = request.app.state.glmkit
    client, adapter_id = state.resolve_model(req.model)
    tools, choice, legacy, choice_field = _tool_request(req)
    character = req.character.model_dump() if req.character else None
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    messages = _messages(req)
    check_prompt_size([messages, tools], client, "messages")
    max_tokens = req.max_completion_tokens or req.max_tokens or state.settings.default_max_tokens
    grounding = None
    if req.knowledge_base is not None:
        grounding = await knowledge.ground(state, client, req.knowledge_base, messages,
                                           max_tokens or client.max_model_len // 4)
        if not grounding.hits:
            return knowledge.not_found(req, grounding)
        messages = grounding.messages
    try:  # tokenizing is CPU work: off the event loop, which keeps serving the other clients meanwhile
        prompt = await asyncio.to_thread(
            client.chat.render, messages, tools, character, choice, choice_field=choice_field,
            response_format=_response_format(req), parallel_tool_calls=req.parallel_tool_calls)
        params = client.chat.sampling_params(request_params(req, max_tokens, logprobs, adapter_id), prompt,
                                             client.max_model_len)
    except GlmkitError as e:
        raise from_glmkit(e, "messages")
    request_id, created = sse.random_id("chatcmpl-"), sse.now()
    if req.stream:
        return admitted_stream(state, _stream(client, req, prompt, params, legacy, request_id, created, grounding),
                               Work.of([prompt.prompt_ids], params, req.n))
    result = await admitted_collect(state, request, prompt.prompt_ids, params, req.n)
    out = []
    for c in result.outputs:
        parsed = client.chat.parse(prompt, c.token_ids)
        out.append({"index": c.index, "message": _message(parsed, legacy, req.model == CHATGLM3_DEMO_MODEL),
                    "logprobs": sse.chat_logprobs(client.tokenizer, c.logprobs or []) if logprobs is not None else None,
                    "finish_reason": _finish_reason(c.finish_reason, parsed.tool_calls, legacy)})
    usage = sse.usage(len(prompt.prompt_ids), result.num_output_tokens, result.num_cached_tokens)
    body = {"id": request_id, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": "glmkit", "choices": out, "usage": usage}
    if grounding is not None:
        body["citations"] = grounding.citations(out[0]["message"]["content"] or "")
    return body


async def _stream(client, req, prompt, params, legacy, request_id, created, grounding=None):
    model = req.model
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    streams = [client.chat.stream(prompt) for _ in range(req.n)]
    prompt_tokens = completion_tokens = cached = 0
    try:
        for i in range(req.n):
            first = sse.chat_chunk(request_id, model, created, [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            if grounding is not None and i == 0:  # the passages before the answer: a page can show them at once
                first["citations"] = grounding.citations()
            yield sse.sse(first)
        async for d in client.generate(prompt.prompt_ids, params, uuid.uuid4().hex):
            stream = streams[d.index]
            new = stream.feed(d.token_ids, d.finished)
            if new or (d.logprobs and req.logprobs):
                choice = {"index": d.index, "delta": {"content": new}, "finish_reason": None,
                          "logprobs": sse.chat_logprobs(client.tokenizer, d.logprobs) if req.logprobs and d.logprobs else None}
                yield sse.sse(sse.chat_chunk(request_id, model, created, [choice]))
            if d.finished:
                calls = stream.result.tool_calls if prompt.tools else []
                for chunk in _call_chunks(calls, legacy, d.index):
                    yield sse.sse(sse.chat_chunk(request_id, model, created, [chunk]))
                yield sse.sse(sse.chat_chunk(request_id, model, created, [
                    {"index": d.index, "delta": {}, "logprobs": None,
                     "finish_reason": _finish_reason(d.finish_reason, calls, legacy)}]))
                prompt_tokens, cached = d.num_prompt_tokens, d.num_cached_tokens
                completion_tokens += d.num_output_tokens
        if include_usage:
            yield sse.sse(sse.chat_chunk(request_id, model, created, [],
                                         sse.usage(prompt_tokens, completion_tokens, cached)))
        yield sse.DONE
    except Exception as e:  # noqa: BLE001 - the stream has started; report in-band and end it
        yield sse.error_event(e)


def _call_chunks(calls, legacy: bool, index: int) -> list[dict]:
    """The streamed form of a finished choice's tool calls: per call its name, then its arguments, as OpenAI
    streams them (or one `function_call` delta for the older functions API)."""
    if calls and legacy:
        delta = {"function_call": {"name": calls[0].name, "arguments": calls[0].arguments}}
        return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]
    chunks = []
    for n, call in enumerate(calls):
        head = {"index": n, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        args = {"index": n, "function": {"arguments": call.arguments}}
        chunks += [{"index": index, "delta": {"tool_calls": [part]}, "logprobs": None, "finish_reason": None}
                   for part in (head, args)]
    return chunks
