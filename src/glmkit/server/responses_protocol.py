"""The Responses API's request body and its translation into what the chat layer takes.

`input` items are checked here (errors name `input[i]...`) and normalized into the stored form OpenAI lists
under /input_items (every item with an id). `chat_messages` turns stored items into OpenAI chat messages, the
same dicts the chat route passes to `ChatServing.render`; tools, tool choice and `text.format` are translated
into their chat shapes too. Raises InvalidParameterError (the routes map it to a 400). Knows nothing of the
engine or of HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from ..errors import InvalidParameterError
from .protocol import JSONObjectText, Model, NonEmpty, one_of
from .streaming import random_id

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
INCLUDABLE = ("file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
              "message.input_image.image_url", "computer_call_output.output.image_url",
              "code_interpreter_call.outputs", "reasoning.encrypted_content", "message.output_text.logprobs")
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class TextFormatPlain(Model):
    type: Literal["text", "json_object"] = "text"


class TextFormatSchema(Model):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["json_schema"]
    name: str = Field(pattern=NAME_RE.pattern)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextConfig(Model):
    format: one_of(TextFormatPlain, TextFormatSchema, fallback=TextFormatPlain) | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# --- input items (what `input_items` takes; errors name input[i]...) ------------------------------------------

class InputText(Model):
    type: Literal["input_text"]
    text: str


class OutputText(Model):
    type: Literal["output_text"]
    text: str


class Refusal(Model):
    type: Literal["refusal"]
    refusal: str


class InputMessage(Model):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer"]
    content: str | list[InputText] = Field(description="text, or input_text parts (these models read text only)")
    id: str | None = None


class AssistantInputMessage(Model):
    type: Literal["message"] = "message"
    role: Literal["assistant"]
    content: str | list[one_of(OutputText, InputText, Refusal, fallback=OutputText)]
    id: str | None = None


class FunctionCallInput(Model):
    type: Literal["function_call"]
    call_id: NonEmpty
    name: NonEmpty
    arguments: JSONObjectText = "{}"
    id: str | None = None


class FunctionCallOutputInput(Model):
    type: Literal["function_call_output"]
    call_id: NonEmpty
    output: str | list[InputText]
    id: str | None = None


class ItemReference(Model):
    type: Literal["item_reference"]
    id: NonEmpty = Field(description="an item of a stored response")


class ReasoningInput(Model):
    """Another model's reasoning: nothing of it is rendered (as OpenAI drops it across models)."""
    type: Literal["reasoning"]


def _message_model(item: dict):
    """A message item (its `type` may be left out): the assistant's, or another role's."""
    if item.get("type", "message" if "role" in item else None) == "message":
        return AssistantInputMessage if item.get("role") == "assistant" else InputMessage
    return None


InputItem = one_of(InputMessage, AssistantInputMessage, FunctionCallInput, FunctionCallOutputInput, ItemReference,
                   ReasoningInput, fallback=FunctionCallInput, choose=_message_model)


# --- tools and tool choice -----------------------------------------------------------------------------------

class FunctionTool(Model):
    type: Literal["function"] = Field(description='only "function" tools: no built-in tools on this server')
    name: str = Field(pattern=NAME_RE.pattern)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(Model):
    type: Literal["function"]
    name: str


class ToolChoiceAllowed(Model):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


class Reasoning(Model):
    """Accepted only switched off: these models do not reason."""
    effort: Literal["none"] | None = None
    summary: Literal["none"] | None = None
    generate_summary: Literal["none"] | None = None


def _off(value: bool) -> bool:
    if value:
        raise ValueError("background responses are not supported; use stream")
    return value


class ResponsesRequest(Model):
    # Without a previous response there must be input (a string, or at least one item).
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["input"], "properties": {"input": {"anyOf": [{"type": "string"}, {"type": "array", "contains": {
            "not": {"required": ["type"], "properties": {"type": {"const": "reasoning"}}}}}]}}},
        {"required": ["previous_response_id"], "properties": {"previous_response_id": {"type": "string"}}}]})
    model: str
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: (Literal["none", "auto", "required"] | one_of(ToolChoiceFunction, ToolChoiceAllowed)
                  | None) = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    store: bool | None = None
    text: TextConfig | None = None
    metadata: dict[str, str] | None = Field(None, json_schema_extra={
        "maxProperties": 16, "propertyNames": {"maxLength": 64}, "additionalProperties": {"maxLength": 512}})
    include: list[Literal[INCLUDABLE]] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    # Accepted only in their "off" form: nothing here can honour them.
    reasoning: Reasoning | None = None
    background: Annotated[bool, AfterValidator(_off), WithJsonSchema({"const": False})] | None = Field(
        None, description="background responses are not supported: use stream")
    conversation: None = Field(None, description="not supported: chain responses with previous_response_id")
    prompt: None = Field(None, description="prompt templates are not supported: send `input`")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 pairs; keys up to 64 characters, values up to 512")
        return v


def plain(value):
    """Request models back to the plain values the functions below read (unset fields left out)."""
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True)
    return [plain(v) for v in value] if isinstance(value, list) else value


def unsupported(req: ResponsesRequest) -> None:
    """Fields this server cannot honour: a 400 naming the field, as OpenAI answers for a model without them."""
    reasoning = plain(req.reasoning) or {}
    for key in ("effort", "summary", "generate_summary"):
        if reasoning.get(key) not in (None, "none"):
            raise InvalidParameterError(f"reasoning.{key}", reasoning[key], "is not supported by this model (it "
                                        "does not reason); leave `reasoning` out")
    if req.background:
        raise InvalidParameterError("background", True, "background responses are not supported; use stream")
    if req.conversation is not None:
        raise InvalidParameterError("conversation", req.conversation, "the Conversations API is not supported; "
                                    "chain responses with previous_response_id")
    if req.prompt is not None:
        raise InvalidParameterError("prompt", req.prompt, "prompt templates are not supported; send `input`")
    for j, name in enumerate(req.include or []):
        if name not in INCLUDABLE:
            raise InvalidParameterError(f"include[{j}]", name, f"must be one of {', '.join(INCLUDABLE)}")


# --- input items ------------------------------------------------------------------------------------------

def _texts(content, field: str, assistant: bool) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise InvalidParameterError(field, content, "must be a string or a list of text content parts")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        allowed = ("output_text", "input_text", "refusal") if assistant else ("input_text",)
        if kind not in allowed:
            raise InvalidParameterError(f"{field}[{j}].type", kind, f"must be {' or '.join(allowed)}: these "
                                        "models read text only")
        text = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(text, str):
            raise InvalidParameterError(f"{field}[{j}].text", text, "must be a string")
        out.append(text)
    return out


def _string(item: Mapping, key: str, field: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidParameterError(f"{field}.{key}", value, "is required and must be a non-empty string")
    return value


def _arguments(value, field: str) -> str:
    if isinstance(value, str) and not value.strip():
        return "{}"
    try:
        ok = isinstance(value, str) and isinstance(json.loads(value), dict)
    except ValueError:
        ok = False
    if not ok:
        raise InvalidParameterError(field, value, 'must be the text of a JSON object, e.g. "{\\"city\\": \\"Paris\\"}"')
    return value


def message_item(role: str, texts: list[str], item_id: str | None = None, status: str = "completed") -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    parts = [{"type": kind, "text": t, **({"annotations": [], "logprobs": []} if role == "assistant" else {})}
             for t in texts]
    return {"id": item_id or random_id("msg_"), "type": "message", "status": status, "role": role,
            "content": parts}


def input_items(raw, resolve: Callable[[str], dict | None]) -> list[dict]:
    """The request's `input` -> stored items; `resolve` finds the item an `item_reference` names."""
    if raw is None:
        return []
    if isinstance(raw, str):
        return [message_item("user", [raw])]
    out = []
    for i, item in enumerate(raw):
        field = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in MESSAGE_ROLES:
                raise InvalidParameterError(f"{field}.role", role, f"must be one of {', '.join(MESSAGE_ROLES)}")
            texts = _texts(item.get("content"), f"{field}.content", role == "assistant")
            out.append(message_item(role, texts, item.get("id")))
        elif kind == "function_call":
            out.append({"id": item.get("id") or random_id("fc_"), "type": "function_call", "status": "completed",
                        "call_id": _string(item, "call_id", field), "name": _string(item, "name", field),
                        "arguments": _arguments(item.get("arguments", "{}"), f"{field}.arguments")})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = "\n".join(_texts(output, f"{field}.output", False))
            out.append({"id": item.get("id") or random_id("fco_"), "type": "function_call_output",
                        "status": "completed", "call_id": _string(item, "call_id", field), "output": output})
        elif kind == "item_reference":
            found = resolve(_string(item, "id", field))
            if found is None:
                raise InvalidParameterError(f"{field}.id", item["id"], "names no stored item")
            out.append(found)
        elif kind == "reasoning":
            continue  # another model's reasoning: nothing of it is rendered (as OpenAI drops it across models)
        else:
            raise InvalidParameterError(f"{field}.type", kind, "must be message, function_call, "
                                        "function_call_output or item_reference")
    return out


def chat_messages(items: list[dict]) -> list[dict]:
    """Stored items -> chat messages: developer -> system; function calls join the assistant message before them
    (or start one); function call outputs -> tool messages."""
    out: list[dict] = []
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            out.append({"role": role, "content": "\n".join(p.get("text", p.get("refusal", ""))
                                                           for p in item["content"])})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "tool_calls": [call]})
        elif item["type"] == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return out


# --- tools, tool choice, text format ---------------------------------------------------------------------

def tools(raw: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
    """-> (the tools as the response echoes them, the chat-shaped tools for `render`)."""
    echo, chat = [], []
    for j, tool in enumerate(raw or []):
        if tool.get("type") != "function":
            raise InvalidParameterError(f"tools[{j}].type", tool.get("type"), 'only "function" tools are '
                                        "supported (no built-in tools on this server)")
        name = tool.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidParameterError(f"tools[{j}].name", name, "must be 1 to 64 letters, digits, _ . or -")
        params = tool.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise InvalidParameterError(f"tools[{j}].parameters", params, "must be a JSON schema object")
        description = tool.get("description")
        echo.append({"type": "function", "name": name, "description": description, "parameters": params,
                     "strict": tool.get("strict", True)})
        function = {"name": name, "description": description, "parameters": params}
        chat.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return echo, chat or None


def tool_choice(choice, chat_tools: list[dict] | None):
    """-> (the chat tool choice, the tools shown); `allowed_tools` narrows the tools to its list."""
    if choice is None or isinstance(choice, str):
        return choice, chat_tools
    kind = choice.get("type")
    if kind == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, chat_tools
    if kind == "allowed_tools" and choice.get("mode") in ("auto", "required"):
        names = {t.get("name") for t in choice.get("tools") or [] if isinstance(t, Mapping)}
        kept = [t for t in chat_tools or [] if t["function"]["name"] in names]
        return choice["mode"], kept or None
    raise InvalidParameterError("tool_choice", choice, 'must be "none", "auto", "required", {"type": "function", '
                                '"name": ...} or {"type": "allowed_tools", "mode": ..., "tools": [...]}')


def text_format(config: TextConfig | None) -> tuple[dict, dict | None]:
    """-> (`text` as the response echoes it, the chat `response_format` for `render`; None for plain text)."""
    fmt = config.format if config and config.format else TextFormatPlain()
    echo = {"format": fmt.model_dump(by_alias=True, exclude_none=True)}
    if config and config.verbosity:
        echo["verbosity"] = config.verbosity
    if fmt.type == "text":
        return echo, None
    if fmt.type == "json_object":
        return echo, {"type": "json_object"}
    schema = {k: v for k, v in (("name", fmt.name), ("description", fmt.description), ("schema", fmt.schema_),
                                ("strict", fmt.strict)) if v is not None}
    return echo, {"type": "json_schema", "json_schema": schema}
