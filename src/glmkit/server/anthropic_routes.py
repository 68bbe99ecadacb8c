"""Anthropic's Messages API: POST /v1/messages (one message or an SSE stream of message events) and
POST /v1/messages/count_tokens, over the same chat layer as /v1/chat/completions.

The request is translated into OpenAI-style messages/tools (anthropic_protocol.py); the model's tool calls come
back as `tool_use` blocks with "toolu_" ids. Stop sequences are cut from the text (and held back while streaming,
so none of one is ever shown). Errors are Anthropic-shaped (errors.py does that by path).
"""

from __future__ import annotations

import asyncio
import json
import uuid

from fastapi import APIRouter, Request

from ..engine.sampling_params import SamplingParams
from ..errors import GlmkitError
from . import streaming as sse
from .anthropic_protocol import (CountTokensRequest, MessageResponse, MessagesRequest, TokenCount, to_messages,
                                 to_tools)
from .errors import anthropic_error_body, error_responses, from_glmkit
from .generation import admitted_collect, admitted_stream
from .limits import check_prompt_size
from .state import Work

router = APIRouter()


async def _render(req: CountTokensRequest, request: Request, bounded: bool = True):
    """-> (state, client, adapter id, prompt, parallel); `bounded`: refuse text that cannot fit the context before
    tokenizing it (count_tokens counts whatever it is given)."""
    state = request.app.state.glmkit
    client, adapter_id = state.resolve_model(req.model)
    tools, choice, parallel = to_tools(req)
    messages = to_messages(req)
    if bounded:
        check_prompt_size([messages, tools], client, "messages")
    try:  # tokenizing is CPU work: off the event loop
        prompt = await asyncio.to_thread(client.chat.render, messages, tools, None, choice,
                                         choice_field="tool_choice", parallel_tool_calls=parallel)
    except GlmkitError as e:
        raise from_glmkit(e, "messages")
    return state, client, adapter_id, prompt, parallel


@router.post("/v1/messages/count_tokens", responses={
    200: {"model": TokenCount, "description": "The prompt's tokens"},
    **error_responses(400, 404, 408, 413, 503, anthropic=True)})
async def count_tokens(req: CountTokensRequest, request: Request):
    _, _, _, prompt, _ = await _render(req, request, bounded=False)
    return {"input_tokens": len(prompt.prompt_ids)}


@router.post("/v1/messages", responses={
    200: {"model": MessageResponse, "description": "The message; with `stream: true` an SSE stream of events"},
    **error_responses(400, 404, 408, 413, 429, 503, anthropic=True)})
async def messages(req: MessagesRequest, request: Request):
    state, client, adapter_id, prompt, parallel = await _render(req, request)
    try:
        params = client.chat.sampling_params(SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            stop=req.stop_sequences, max_tokens=req.max_tokens, adapter_id=adapter_id), prompt, client.max_model_len)
    except GlmkitError as e:
        raise from_glmkit(e, "messages")
    message_id = sse.random_id("msg_")
    if req.stream:
        return admitted_stream(state, _stream(client, req, prompt, params, parallel, message_id),
                               Work.of([prompt.prompt_ids], params))
    result = await admitted_collect(state, request, prompt.prompt_ids, params)
    out = result.outputs[0]
    parsed = client.chat.parse(prompt, out.token_ids)
    calls = _calls(parsed, prompt, parallel)
    stop_reason, stop_sequence = _stop(out.finish_reason, out.stop_reason, req.stop_sequences, calls)
    content = parsed.content  # the chat layer ends it before a stop sequence
    blocks = [{"type": "text", "text": content}] if content or not calls else []
    blocks += [_tool_use(c) for c in calls]
    return {"id": message_id, "type": "message", "role": "assistant", "model": req.model, "content": blocks,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": _usage(len(prompt.prompt_ids), result.num_output_tokens, result.num_cached_tokens)}


def _calls(parsed, prompt, parallel: bool) -> list:
    calls = parsed.tool_calls if prompt.tools else []
    return calls[:1] if not parallel else calls


def _stop(finish_reason, stop_reason, stop_sequences, calls) -> tuple[str, str | None]:
    """-> (Anthropic stop_reason, stop_sequence)."""
    if calls:
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str) and stop_reason in (stop_sequences or []):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _tool_use(call) -> dict:
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = None
    return {"type": "tool_use", "id": sse.random_id("toolu_"), "name": call.name,
            "input": arguments if isinstance(arguments, dict) else {}}


def _usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    """Anthropic counts cached prompt tokens apart: input_tokens + cache_read_input_tokens is the prompt."""
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def event(data: dict) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Blocks:
    """The content-block events of one streamed message: a text block opened by its first text, closed before
    the tool_use blocks (or, when the message has neither, one empty text block, as a non-streamed one has)."""

    def __init__(self):
        self.index, self.text_open = 0, False

    def text(self, text: str) -> list[str]:
        if not text:
            return []
        out = [] if self.text_open else [self._start({"type": "text", "text": ""})]
        self.text_open = True
        return out + [event({"type": "content_block_delta", "index": self.index,
                             "delta": {"type": "text_delta", "text": text}})]

    def finish(self, calls) -> list[str]:
        out = [self._start({"type": "text", "text": ""})] if not self.text_open and not calls else []
        if self.text_open or not calls:
            out.append(self._stop())
        for call in calls:
            block = _tool_use(call)
            out += [self._start({**block, "input": {}}),
                    event({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "input_json_delta",
                                     "partial_json": json.dumps(block["input"], ensure_ascii=False)}}),
                    self._stop()]
        return out

    def _start(self, block: dict) -> str:
        return event({"type": "content_block_start", "index": self.index, "content_block": block})

    def _stop(self) -> str:
        self.index += 1
        return event({"type": "content_block_stop", "index": self.index - 1})


async def _stream(client, req, prompt, params, parallel, message_id):
    stream, blocks = client.chat.stream(prompt), _Blocks()  # the stream ends its text before a stop sequence
    # Sent at once; the prompt's cached share is known later and message_delta's usage carries it.
    yield event({"type": "message_start", "message": {
        "id": message_id, "type": "message", "role": "assistant", "model": req.model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": _usage(len(prompt.prompt_ids), 0, 0)}})
    yield event({"type": "ping"})
    try:
        async for d in client.generate(prompt.prompt_ids, params, uuid.uuid4().hex):
            new = stream.feed(d.token_ids, d.finished)
            if not d.finished:
                for e in blocks.text(new):
                    yield e
                continue
            calls = _calls(stream.result, prompt, parallel)
            stop_reason, stop_sequence = _stop(d.finish_reason, d.stop_reason, req.stop_sequences, calls)
            for e in blocks.text(new) + blocks.finish(calls):
                yield e
            yield event({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                         "usage": _usage(d.num_prompt_tokens, d.num_output_tokens, d.num_cached_tokens)})
            yield event({"type": "message_stop"})
    except Exception as e:  # noqa: BLE001 - the stream has started; report in-band and end it
        err = sse.stream_error(e)
        yield event(anthropic_error_body(err.status, err.message))
