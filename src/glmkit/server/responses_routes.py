"""OpenAI's Responses API: POST /v1/responses (one response object, or its typed SSE events), GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items.

A request becomes chat messages (responses_protocol.py) and then runs exactly as a chat completion does:
`ChatServing.render` -> `sampling_params` -> the engine -> `parse` (or a `ChatStream` while streaming). The
answer's text becomes one `message` output item, its tool calls `function_call` items. Stored responses
(response_store.py) give `previous_response_id` its conversation; `instructions` are never carried over.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Query, Request

from ..engine.sampling_params import SamplingParams
from ..errors import GlmkitError, InvalidParameterError, excerpt
from . import responses_protocol as rp
from . import streaming as sse
from .errors import APIError, error_responses, from_glmkit
from .generation import admitted_collect, admitted_stream
from .limits import check_prompt_size
from .response_store import ResponseStore, StoredResponse
from .responses_protocol import ResponsesRequest
from .responses_schema import DeletedResponse, InputItemList, ResponseObject
from .state import Work

router = APIRouter()
LOGPROBS = "message.output_text.logprobs"


def response_store(app) -> ResponseStore:
    """The server's stored responses (previous_response_id, GET and DELETE)."""
    return app.state.glmkit.responses


def _api_error(e: GlmkitError) -> APIError:
    """A glmkit error, its field named as the Responses request names it."""
    if isinstance(e, InvalidParameterError):
        field = e.field
        for chat_name, name in (("response_format.json_schema", "text.format"), ("response_format", "text.format"),
                                ("messages", "input")):
            if field.startswith(chat_name):
                field = name if chat_name == "messages" else name + field[len(chat_name):]
                break
        return APIError(400, str(e), param=field, code="invalid_value")
    return from_glmkit(e, "input")


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"no stored response with id {excerpt(response_id)} (responses made with store=false, deleted, "
                    "or evicted are not kept)", "not_found_error", "response_id", "response_not_found")


@dataclass
class _Plan:
    """One request, translated: what the engine runs and the fields the response object echoes."""
    req: ResponsesRequest
    echo: dict                 # the response object's fields that do not change while it runs
    history: list[dict]        # the previous response's conversation
    items: list[dict]          # this request's input items
    logprobs: int | None
    store: bool

    def response(self, status: str, output: list, usage: dict | None = None, error: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        done = status in ("completed", "incomplete")
        return {**self.echo, "status": status, "completed_at": sse.now() if done else None, "error": error,
                "incomplete_details": incomplete, "output": output, "usage": usage}

    def calls(self, calls: list) -> list:
        if self.req.parallel_tool_calls is False:
            calls = calls[:1]
        return calls[:self.req.max_tool_calls] if self.req.max_tool_calls else calls


def _echo(req: ResponsesRequest, echo_tools: list, echo_text: dict, store: bool) -> dict:
    return {"id": sse.random_id("resp_", 32), "object": "response", "created_at": sse.now(), "status": None,
            "background": False, "completed_at": None, "error": None, "incomplete_details": None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": req.model, "output": [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "prompt_cache_key": req.prompt_cache_key,
            "reasoning": {"effort": None, "summary": None}, "safety_identifier": req.safety_identifier,
            "service_tier": "default", "store": store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": echo_text, "tool_choice": rp.plain(req.tool_choice) or "auto", "tools": echo_tools,
            "top_logprobs": req.top_logprobs or 0, "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": req.truncation or "disabled", "usage": None, "user": req.user, "metadata": req.metadata or {}}


def _usage(input_tokens: int, output_tokens: int, cached: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _call_item(call, status: str = "completed", arguments: str | None = None) -> dict:
    return {"id": "fc_" + call.id.removeprefix("call_"), "type": "function_call", "status": status,
            "arguments": call.arguments if arguments is None else arguments, "call_id": call.id, "name": call.name}


def _droppable(messages: list[dict]) -> tuple[int, int] | None:
    """The oldest turn (first non-system message up to the next user message) that `truncation: auto` drops."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    end = next((i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"), None) \
        if start is not None else None
    return (start, end) if end is not None else None


def _render(client, req: ResponsesRequest, messages, chat_tools, choice, response_format):
    while True:
        prompt = client.chat.render(messages, chat_tools, None, choice, choice_field="tool_choice",
                                    response_format=response_format,
                                    parallel_tool_calls=req.parallel_tool_calls is not False)
        cut = _droppable(messages) if req.truncation == "auto" else None
        if len(prompt.prompt_ids) < client.max_model_len or cut is None:
            return prompt
        messages = messages[:cut[0]] + messages[cut[1]:]


@router.post("/v1/responses", responses={
    200: {"model": ResponseObject, "description": "The response; with `stream: true` an SSE stream of events"},
    **error_responses(400, 404, 408, 413, 429, 503)})
async def create_response(req: ResponsesRequest, request: Request):
    state = request.app.state.glmkit
    client, adapter_id = state.resolve_model(req.model)
    store = response_store(request.app)
    history = []
    if req.previous_response_id is not None:
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise APIError(400, f"previous_response_id={excerpt(req.previous_response_id)}: no stored response has this "
                           "id (store=false, deleted, or evicted responses are not kept)",
                           param="previous_response_id", code="previous_response_not_found")
        history = previous.conversation
    try:
        rp.unsupported(req)
        echo_tools, chat_tools = rp.tools(rp.plain(req.tools))
        choice, shown_tools = rp.tool_choice(rp.plain(req.tool_choice), chat_tools)
        echo_text, response_format = rp.text_format(req.text)
        items = rp.input_items(rp.plain(req.input), store.item)
        if not history and not items:
            raise InvalidParameterError("input", req.input, "is required: a string or a list of input items")
        messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) \
            + rp.chat_messages(history + items)
        if req.truncation != "auto":  # (auto drops old turns until the rest fits)
            check_prompt_size([messages, shown_tools], client, "input")
        # tokenizing is CPU work: off the event loop
        prompt = await asyncio.to_thread(_render, client, req, messages, shown_tools, choice, response_format)
        logprobs = (req.top_logprobs or 0) if LOGPROBS in (req.include or []) else None
        params = SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, logprobs=logprobs,
                                max_tokens=req.max_output_tokens or state.settings.default_max_tokens,
                                adapter_id=adapter_id)
        params = client.chat.sampling_params(params, prompt, client.max_model_len)
    except GlmkitError as e:
        raise _api_error(e)
    plan = _Plan(req, _echo(req, echo_tools, echo_text, req.store is not False), history, items, logprobs,
                 req.store is not False)
    if req.stream:
        return admitted_stream(state, _stream(client, plan, prompt, params, store),
                               Work.of([prompt.prompt_ids], params))
    result = await admitted_collect(state, request, prompt.prompt_ids, params)
    out = result.outputs[0]
    parsed = client.chat.parse(prompt, out.token_ids)
    calls = plan.calls(parsed.tool_calls)
    status = "incomplete" if out.finish_reason == "length" else "completed"
    output = []
    if parsed.content or not calls:
        message = rp.message_item("assistant", [parsed.content], status=status)
        if logprobs is not None:
            message["content"][0]["logprobs"] = sse.chat_logprobs(client.tokenizer, out.logprobs or [])["content"]
        output.append(message)
    output += [_call_item(c) for c in calls]
    response = plan.response(status, output, _usage(len(prompt.prompt_ids), result.num_output_tokens,
                                                     result.num_cached_tokens))
    _keep(store, plan, response)
    return response


def _keep(store: ResponseStore, plan: _Plan, response: dict) -> None:
    if plan.store:
        store.put(StoredResponse(response, plan.items, plan.history + plan.items + response["output"]))


class _Events:
    """Typed SSE events (`event:` and `data:` lines), numbered from 0 by `sequence_number`."""

    def __init__(self):
        self.sequence = 0

    def __call__(self, type_: str, **fields) -> str:
        payload = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {type_}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(client, plan: _Plan, prompt, params, store: ResponseStore):
    event, stream = _Events(), client.chat.stream(prompt)
    yield event("response.created", response=plan.response("in_progress", []))
    yield event("response.in_progress", response=plan.response("in_progress", []))
    output, shown, pending, all_logprobs = [], [], [], []
    message = None
    finish_reason, usage = None, _usage(len(prompt.prompt_ids), 0, 0)
    try:
        async for d in client.generate(prompt.prompt_ids, params, uuid.uuid4().hex):
            text = stream.feed(d.token_ids, d.finished)
            if plan.logprobs is not None and d.logprobs:
                new = sse.chat_logprobs(client.tokenizer, d.logprobs)["content"]
                pending += new
                all_logprobs += new
            if text:
                if message is None:
                    message = rp.message_item("assistant", [], status="in_progress")
                    for e in _open_message(event, message, len(output)):
                        yield e
                    output.append(message)
                yield event("response.output_text.delta", item_id=message["id"], output_index=len(output) - 1,
                            content_index=0, delta=text, logprobs=pending)
                shown.append(text)
                pending = []
            if d.finished:
                finish_reason = d.finish_reason
                usage = _usage(d.num_prompt_tokens, d.num_output_tokens, d.num_cached_tokens)
        status = "incomplete" if finish_reason == "length" else "completed"
        calls = plan.calls(stream.result.tool_calls if prompt.tools else [])
        if message is None and (shown or not calls):
            message = rp.message_item("assistant", [], status="in_progress")
            for e in _open_message(event, message, len(output)):
                yield e
            output.append(message)
        if message is not None:
            done = rp.message_item("assistant", ["".join(shown)], message["id"], status)
            done["content"][0]["logprobs"] = all_logprobs
            output[-1] = done
            base = dict(item_id=done["id"], output_index=len(output) - 1, content_index=0)
            yield event("response.output_text.done", **base, text=done["content"][0]["text"], logprobs=all_logprobs)
            yield event("response.content_part.done", **base, part=done["content"][0])
            yield event("response.output_item.done", output_index=len(output) - 1, item=done)
        for call in calls:
            item, index = _call_item(call), len(output)
            output.append(item)
            yield event("response.output_item.added", output_index=index, item=_call_item(call, "in_progress", ""))
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=call.arguments)
            yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=call.arguments)
            yield event("response.output_item.done", output_index=index, item=item)
        response = plan.response(status, output, usage)
        _keep(store, plan, response)
        yield event("response.completed" if status == "completed" else "response.incomplete", response=response)
    except Exception as e:  # noqa: BLE001 - the stream has started; report in-band and end it
        err = _api_error(e) if isinstance(e, GlmkitError) else sse.stream_error(e)
        code, message_text, param = err.code or "invalid_prompt", err.message, err.param
        yield event("error", code=code, message=message_text, param=param)
        yield event("response.failed", response=plan.response("failed", output, usage,
                                                               {"code": "server_error", "message": message_text}))


def _open_message(event: _Events, message: dict, index: int):
    yield event("response.output_item.added", output_index=index, item=message)
    yield event("response.content_part.added", item_id=message["id"], output_index=index, content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})


@router.get("/v1/responses/{response_id}", responses={
    200: {"model": ResponseObject, "description": "The stored response"}, **error_responses(404, 503)})
async def get_response(response_id: str, request: Request):
    entry = response_store(request.app).get(response_id)
    if entry is None:
        raise _not_found(response_id)
    return entry.response


@router.delete("/v1/responses/{response_id}", responses={
    200: {"model": DeletedResponse, "description": "The response is deleted"}, **error_responses(404, 503)})
async def delete_response(response_id: str, request: Request):
    if not response_store(request.app).delete(response_id):
        raise _not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items", responses={
    200: {"model": InputItemList, "description": "A page of the response's input items"},
    **error_responses(400, 404, 503)})
async def list_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                           order: str = Query("desc", pattern="^(asc|desc)$"), after: str | None = None):
    entry = response_store(request.app).get(response_id)
    if entry is None:
        raise _not_found(response_id)
    items = entry.input_items if order == "asc" else entry.input_items[::-1]
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise APIError(400, f"after={excerpt(after)}: no input item of {response_id} has this id", param="after",
                           code="invalid_value")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
