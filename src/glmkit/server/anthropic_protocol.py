"""Request bodies of Anthropic's Messages API (POST /v1/messages and /v1/messages/count_tokens) and their
translation into the OpenAI-style messages, tools and tool choice that glmkit's chat layer takes.

Only what a text-only model can honour is accepted: text, tool_use and tool_result blocks, and custom tools.
Anything else (images, documents, server tools) is a 400 that names the field. Unknown keys (cache_control,
metadata, thinking, service_tier ...) are ignored. Knows nothing of the engine.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field

from .errors import APIError
from .protocol import Model, NonEmpty, one_of


class TextBlock(Model):
    type: Literal["text"]
    text: str


class ToolUseBlock(Model):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(Model):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool = False


class UserMessage(Model):
    role: Literal["user"]
    content: str | Annotated[list[Annotated[Union[TextBlock, ToolResultBlock], Field(discriminator="type")]],
                             Field(min_length=1)]


class AssistantMessage(Model):
    role: Literal["assistant"]
    content: str | Annotated[list[Annotated[Union[TextBlock, ToolUseBlock], Field(discriminator="type")]],
                             Field(min_length=1)]


class SystemMessage(Model):
    """What newer SDKs' SystemMessageParam sends inside `messages`; it becomes a system message."""
    role: Literal["system"]
    content: str | Annotated[list[TextBlock], Field(min_length=1)]


# tool_use blocks belong in the assistant's messages, tool_result blocks in the user's
Message = one_of(UserMessage, AssistantMessage, SystemMessage, key="role", fallback=UserMessage)


class Tool(Model):
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoiceMode(Model):
    type: Literal["auto", "any", "none"]
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Model):
    type: Literal["tool"]
    name: NonEmpty
    disable_parallel_tool_use: bool = False


ToolChoice = one_of(ToolChoiceMode, ToolChoiceTool, fallback=ToolChoiceMode)


class CountTokensRequest(Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None


def _text(blocks: str | list[TextBlock] | None) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    return "\n".join(b.text for b in blocks)  # as the chat layer joins text parts


def to_messages(req: CountTokensRequest) -> list[dict]:
    """Anthropic messages (+ system) -> glmkit's OpenAI-style message dicts, in order: tool_use blocks become an
    assistant message's `tool_calls`, each tool_result block a `tool` message (before the user's text)."""
    out = [{"role": "system", "content": _text(req.system)}] if req.system else []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        texts, calls = [], []

        def flush_text():
            if texts:
                out.append({"role": m.role, "content": "\n".join(texts)})
                texts.clear()

        for j, block in enumerate(m.content):
            field = f"messages[{i}].content[{j}]"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif m.role != ("assistant" if isinstance(block, ToolUseBlock) else "user"):
                raise APIError(400, f"{field}: a {block.type} block belongs in a "
                               f"{'assistant' if block.type == 'tool_use' else 'user'} message, not {m.role}",
                               param=f"{field}.type", code="invalid_value")
            elif isinstance(block, ToolUseBlock):
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name,
                                           "arguments": json.dumps(block.input, ensure_ascii=False)}})
            else:
                flush_text()
                text = _text(block.content)
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {text}" if block.is_error else text})
        if m.role == "assistant":
            message = {"role": "assistant", "content": "\n".join(texts)}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        else:
            flush_text()
    return out


def to_tools(req: CountTokensRequest):
    """-> (OpenAI tools or None, glmkit tool choice, parallel_tool_calls)."""
    tools = None
    if req.tools:
        tools = []
        for t in req.tools:
            function = {"name": t.name, "parameters": t.input_schema}
            if t.description is not None:
                function = {"name": t.name, "description": t.description, "parameters": t.input_schema}
            tools.append({"type": "function", "function": function})
    c = req.tool_choice
    if c is None:
        return tools, None, True
    if c.type == "tool":
        if not c.name:
            raise APIError(400, 'tool_choice.name is required when tool_choice.type is "tool"',
                           param="tool_choice.name", code="invalid_value")
        choice = {"type": "function", "function": {"name": c.name}}
    else:
        choice = {"auto": "auto", "any": "required", "none": "none"}[c.type]
    return tools, choice, not c.disable_parallel_tool_use


# --- response bodies (documented in the OpenAPI schema) -----------------------------------------------------

class _Out(BaseModel):
    """A response body: documentation of what the routes send, not validated on the way out."""


class OutTextBlock(_Out):
    type: Literal["text"]
    text: str


class OutToolUseBlock(_Out):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(_Out):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageResponse(_Out):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[OutTextBlock | OutToolUseBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: AnthropicUsage


class TokenCount(_Out):
    input_tokens: int


class MessageStreamEvent(_Out):
    """One event of a streamed message: `event: <type>` and this object as its `data:`."""
    type: Literal["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                  "message_delta", "message_stop", "error"]
    message: MessageResponse | None = None
    index: int | None = None
    content_block: OutTextBlock | OutToolUseBlock | None = None
    delta: dict[str, Any] | None = None
    usage: AnthropicUsage | None = None
    error: dict[str, str] | None = None
