"""POST /v1/chat/completions: messages (+ tools, + CharacterGLM profile) -> one answer or an SSE stream, with
tool calls returned as OpenAI `tool_calls` (also streamed as `delta.tool_calls`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from ..errors import GlmkitError
from . import streaming as sse
from .errors import APIError, from_glmkit
from .generation import EngineStream, collect, sampling_params, total_usage
from .protocol import ChatCompletionRequest

router = APIRouter()


class ToolPlan:
    """What the request asks of tools: those shown to the model, whether to parse calls, a forced prefix."""

    def __init__(self, req: ChatCompletionRequest, chat_format):
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice
        self.legacy = False
        if tools is None and req.functions:  # the older OpenAI `functions` / `function_call` fields
            tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in req.functions]
            fc = req.function_call
            choice = {"type": "function", "function": fc} if isinstance(fc, dict) else fc
            self.legacy = True
        if choice is not None and not isinstance(choice, str) and not isinstance(choice, dict):
            choice = choice.model_dump()
        self.prefix: list[int] = []
        if not tools and choice not in (None, "none", "auto"):
            field = "function_call" if req.function_call is not None and req.tool_choice is None else "tool_choice"
            raise APIError(400, f"{field} asks for a tool call but the request has no tools; add `tools` or drop "
                           f"{field}", param=field, code="invalid_value")
        if not tools or choice == "none":
            self.tools = None
            return
        names = [t["function"]["name"] for t in tools]
        forced = None
        if isinstance(choice, dict):
            forced = choice.get("function", {}).get("name")
            if forced not in names:
                field = "function_call" if self.legacy else "tool_choice"
                raise APIError(400, f"{field} names the function {forced!r}, which is not in tools "
                               f"({', '.join(names)})", param=field, code="invalid_value")
            tools = [t for t in tools if t["function"]["name"] == forced]
        elif choice == "required":
            forced = names[0] if len(names) == 1 else None
            if forced is None:
                self.prefix = chat_format.forced_call_prefix(None) or []
        if forced is not None:
            self.prefix = chat_format.forced_call_prefix(forced) or []
        self.tools = tools


CALL_STARTS = ("```", "{", "[", "<tool_call>")


def _may_be_call(text: str) -> bool:
    """Whether streamed text could still be the start of a tool call written as JSON or a fence."""
    head = text.lstrip()
    return not head or any(head.startswith(s) or s.startswith(head) for s in CALL_STARTS)


def _messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        out.append(d)
    return out


def _finish_reason(reason: str | None, calls, legacy: bool) -> str | None:
    if calls:
        return "function_call" if legacy else "tool_calls"
    return "stop" if reason == "abort" else reason


def _message(parsed, legacy: bool) -> dict:
    message = {"role": "assistant", "content": parsed.content if parsed.content or not parsed.tool_calls else None}
    if parsed.tool_calls:
        if legacy:
            call = parsed.tool_calls[0]
            message["function_call"] = {"name": call.name, "arguments": call.arguments}
        else:
            message["tool_calls"] = sse.tool_call_dicts(parsed.tool_calls)
    return message


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    state = request.app.state.glmkit
    llm = state.require_model(req.model)
    fmt = llm.chat_format
    plan = ToolPlan(req, fmt)
    character = req.character.model_dump() if req.character else None
    try:
        prompt_ids = llm.render_chat(_messages(req), plan.tools, character) + plan.prefix
    except GlmkitError as e:
        raise from_glmkit(e, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, llm, len(prompt_ids), req.max_completion_tokens or req.max_tokens, logprobs,
                             fmt.stop_token_ids)
    params.skip_special_tokens = False
    state.admit()
    request_id, created = sse.random_id("chatcmpl-"), sse.now()
    if req.stream:
        return EngineStream(_stream(state, llm, req, plan, prompt_ids, params, request_id, created), state.release)
    try:
        choices = await collect(state.engine, prompt_ids, params, request)
    finally:
        state.release()
    out = []
    for index in sorted(choices):
        c = choices[index]
        parsed = fmt.parse(plan.prefix + c["ids"], plan.tools) if plan.tools else fmt.parse(c["ids"])
        out.append({"index": index, "message": _message(parsed, plan.legacy),
                    "logprobs": sse.chat_logprobs(llm.tokenizer, c["logprobs"]) if logprobs is not None else None,
                    "finish_reason": _finish_reason(c["finish_reason"], parsed.tool_calls, plan.legacy)})
    prompt_tokens, completion_tokens, cached = total_usage(choices)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": "glmkit", "choices": out, "usage": sse.usage(prompt_tokens, completion_tokens, cached)}


async def _stream(state, llm, req, plan, prompt_ids, params, request_id, created):
    fmt, model = llm.chat_format, req.model
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    ids = {i: [] for i in range(req.n)}
    shown = {i: "" for i in range(req.n)}
    prompt_tokens = completion_tokens = cached = 0
    try:
        for i in range(req.n):
            yield sse.sse(sse.chat_chunk(request_id, model, created, [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]))
        async for d in state.engine.generate(prompt_ids, params, uuid.uuid4().hex):
            ids[d.index] += d.token_ids
            output = (plan.prefix + ids[d.index]) if plan.prefix else ids[d.index]
            if plan.prefix:
                display = ""  # a forced call: nothing of it is text
            elif d.finished and plan.tools:
                display = fmt.parse(output, plan.tools).content  # what is left once the calls are taken out
            else:
                display = fmt.display_text(output, final=d.finished)
            if plan.tools and not d.finished and _may_be_call(display):
                display = shown[d.index]  # hold text that may turn out to be a tool call
            new = display[len(shown[d.index]):] if display.startswith(shown[d.index]) else ""
            shown[d.index] = display if display.startswith(shown[d.index]) else shown[d.index]
            if new or (d.logprobs and req.logprobs):
                choice = {"index": d.index, "delta": {"content": new}, "finish_reason": None,
                          "logprobs": sse.chat_logprobs(llm.tokenizer, d.logprobs) if req.logprobs and d.logprobs else None}
                yield sse.sse(sse.chat_chunk(request_id, model, created, [choice]))
            if d.finished:
                calls = fmt.parse(output, plan.tools).tool_calls if plan.tools else []
                if calls and plan.legacy:
                    delta = {"function_call": {"name": calls[0].name, "arguments": calls[0].arguments}}
                    yield sse.sse(sse.chat_chunk(request_id, model, created, [
                        {"index": d.index, "delta": delta, "logprobs": None, "finish_reason": None}]))
                elif calls:
                    for n, call in enumerate(calls):  # the name first, then the arguments, as OpenAI streams them
                        head = {"index": n, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}}
                        args = {"index": n, "function": {"arguments": call.arguments}}
                        for part in (head, args):
                            yield sse.sse(sse.chat_chunk(request_id, model, created, [
                                {"index": d.index, "delta": {"tool_calls": [part]}, "logprobs": None,
                                 "finish_reason": None}]))
                yield sse.sse(sse.chat_chunk(request_id, model, created, [
                    {"index": d.index, "delta": {}, "logprobs": None,
                     "finish_reason": _finish_reason(d.finish_reason, calls, plan.legacy)}]))
                prompt_tokens, cached = d.num_prompt_tokens, d.num_cached_tokens
                completion_tokens += d.num_output_tokens
        if include_usage:
            yield sse.sse(sse.chat_chunk(request_id, model, created, [],
                                         sse.usage(prompt_tokens, completion_tokens, cached)))
        yield sse.DONE
    except GlmkitError as e:
        err = from_glmkit(e)
        yield sse.sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
    except Exception as e:  # noqa: BLE001 - the stream has started; report in-band and end it
        yield sse.sse({"error": {"message": f"generation failed: {e}", "type": "server_error", "param": None,
                                 "code": "internal_error"}})
