"""The Responses API's response bodies and stream events, as documented in the OpenAPI schema: what the routes
send (not validated on the way out). Changes when OpenAI's response shapes do; the request side is in
responses_protocol.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

class _Out(BaseModel):
    """A response body: documentation of what the routes send, not validated on the way out."""


class OutputTextPart(_Out):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[dict[str, Any]]


class InputTextPart(_Out):
    type: Literal["input_text"]
    text: str


class MessageItem(_Out):
    id: str
    type: Literal["message"]
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["user", "system", "developer", "assistant"]
    content: list[OutputTextPart | InputTextPart]


class FunctionCallItem(_Out):
    id: str
    type: Literal["function_call"]
    status: Literal["in_progress", "completed"]
    arguments: str
    call_id: str
    name: str


class FunctionCallOutputItem(_Out):
    id: str
    type: Literal["function_call_output"]
    status: Literal["completed"]
    call_id: str
    output: str


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseError(_Out):
    code: str
    message: str


class ResponseObject(_Out):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    background: bool
    completed_at: int | None
    error: ResponseError | None
    incomplete_details: dict[str, str] | None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None
    model: str
    output: list[Item]
    parallel_tool_calls: bool
    previous_response_id: str | None
    prompt_cache_key: str | None
    reasoning: dict[str, Any]
    safety_identifier: str | None
    service_tier: str
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_logprobs: int
    top_p: float
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]


class DeletedResponse(_Out):
    id: str
    object: Literal["response"]
    deleted: Literal[True]


class InputItemList(_Out):
    object: Literal["list"]
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseStreamEvent(_Out):
    """One event of a streamed response: `event: <type>` and this object as its `data:`."""
    type: Literal["response.created", "response.in_progress", "response.output_item.added",
                  "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                  "response.content_part.done", "response.output_item.done", "response.function_call_arguments.delta",
                  "response.function_call_arguments.done", "response.completed", "response.incomplete",
                  "response.failed", "error"]
    sequence_number: int
    response: ResponseObject | None = None
    item: Item | None = None
    item_id: str | None = None
    output_index: int | None = None
    content_index: int | None = None
    part: OutputTextPart | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    code: str | None = None
    message: str | None = None
    param: str | None = None
