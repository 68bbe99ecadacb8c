"""Validate and normalize what callers send: OpenAI- or ChatGLM3-shaped messages, OpenAI tools, and a
CharacterGLM character profile.

After `normalize_messages` every message is a dict with `role` (one of ROLES), `content` (a str), `metadata`
(a str, "" when absent) and, only when given, `tools`, `tool_calls` (OpenAI shape, arguments as JSON object
text), `name` and `tool_call_id`. Renderers can then trust the shape. Knows nothing of tokens or formats.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..errors import InvalidParameterError
from .tool_calls import new_call_id

ROLES = ("system", "user", "assistant", "observation", "tool", "function")
DEFAULT_USER_NAME = "用户"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _content_text(content, field: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidParameterError(f"{field}[{j}].type", kind,
                                            "only text content parts ({'type': 'text', 'text': ...}) are "
                                            "supported by these text-only models")
        # Joined by newlines, as vLLM does, so separate parts do not run into one word.
        return "\n".join(texts)
    raise InvalidParameterError(field, content, "must be a string, null or a list of text content parts")


def _arguments_text(arguments, field: str) -> str:
    if arguments is None:
        return "{}"
    if isinstance(arguments, Mapping):
        return json.dumps(dict(arguments), ensure_ascii=False)
    if isinstance(arguments, str):
        if not arguments.strip():
            return "{}"
        try:
            parsed = json.loads(arguments, parse_constant=_reject_constant)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return arguments
    raise InvalidParameterError(field, arguments, 'must be a JSON object (or its text), e.g. {"city": "北京"}')


def _tool_call(raw, field: str) -> dict:
    if not isinstance(raw, Mapping):
        raise InvalidParameterError(field, raw, 'must be {"id", "type": "function", "function": {"name", '
                                                '"arguments"}}')
    if raw.get("type", "function") not in ("function", None):
        raise InvalidParameterError(f"{field}.type", raw.get("type"), 'only "function" tool calls are supported')
    function = raw.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
        raise InvalidParameterError(f"{field}.function", function, 'must be {"name": str, "arguments": ...}')
    return {"id": raw.get("id") or new_call_id(), "type": "function",
            "function": {"name": function["name"],
                         "arguments": _arguments_text(function.get("arguments"), f"{field}.function.arguments")}}


def _normalize_one(i: int, message) -> dict:
    field = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise InvalidParameterError(field, message, "must be an object like {'role': 'user', 'content': 'hi'}")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidParameterError(f"{field}.role", role, f"must be one of {', '.join(ROLES)}")
    out = {"role": role, "content": _content_text(message.get("content"), f"{field}.content")}
    metadata = message.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        raise InvalidParameterError(f"{field}.metadata", metadata, "must be a string (ChatGLM3 tool name)")
    out["metadata"] = metadata or ""
    if message.get("tools") is not None:
        out["tools"] = message["tools"]  # ChatGLM3 system message: rendered verbatim by that format
    calls = list(message.get("tool_calls") or [])
    # The older OpenAI single-call shape; a client echoing a reply that carried both (glmkit mirrors the first
    # tool call as `function_call` for ChatGLM3's demo clients) sends the same call twice: tool_calls win.
    if message.get("function_call") is not None and not calls:
        calls.append({"type": "function", "function": message["function_call"]})
    if calls:
        if role != "assistant":
            raise InvalidParameterError(f"{field}.tool_calls", calls, "only assistant messages carry tool calls")
        out["tool_calls"] = [_tool_call(c, f"{field}.tool_calls[{j}]") for j, c in enumerate(calls)]
    for key in ("name", "tool_call_id"):
        value = message.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise InvalidParameterError(f"{field}.{key}", value, "must be a string")
            out[key] = value
    return out


def normalize_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)):
        raise InvalidParameterError("messages", messages, "must be a list of message objects")
    if not messages:
        raise InvalidParameterError("messages", [], "must contain at least one message")
    return [_normalize_one(i, m) for i, m in enumerate(messages)]


def normalize_tools(tools, field: str = "tools") -> list[dict] | None:
    """OpenAI tools list -> list of {"type": "function", "function": {...}}; None/[] -> None.

    Entries already in OpenAI shape are kept as the same dict (ChatGLM3 dumps them verbatim); a bare function
    dict {"name", ...} is wrapped.
    """
    if tools is None:
        return None
    if isinstance(tools, Mapping):  # the ChatGLM3 demo server also takes a dict
        tools = demo_tools(tools)
    if not isinstance(tools, (list, tuple)):
        raise InvalidParameterError(field, tools, 'must be a list of {"type": "function", "function": {...}}')
    out = []
    for j, tool in enumerate(tools):
        if isinstance(tool, Mapping) and "function" not in tool and "type" not in tool and "name" in tool:
            tool = {"type": "function", "function": dict(tool)}
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            kind = tool.get("type") if isinstance(tool, Mapping) else tool
            raise InvalidParameterError(f"{field}[{j}].type", kind, 'only "function" tools are supported')
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidParameterError(f"{field}[{j}].function", function,
                                        'must be {"name": str, "description": str, "parameters": {...}}')
        out.append(tool if isinstance(tool, dict) else dict(tool))
    return out or None


_DEMO_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
               "dict": "object"}


def demo_tools(tools: Mapping) -> list:
    """A tools dict as ChatGLM3's demos send it -> a list: one tool (OpenAI or bare function shape), or the
    composite demo's {name: {"name", "description", "params": [{"name", "description", "type", "required"}]}},
    whose params become a JSON schema."""
    if "function" in tools or isinstance(tools.get("name"), str):
        return [tools]
    out = []
    for name, definition in tools.items():
        if not isinstance(definition, Mapping):
            return [tools]  # not that shape: reported by the caller's checks
        function = {k: v for k, v in definition.items() if k != "params"}
        function.setdefault("name", name)
        if isinstance(definition.get("params"), list) and "parameters" not in definition:
            props, required = {}, []
            for param in definition["params"]:
                if not isinstance(param, Mapping) or not isinstance(param.get("name"), str):
                    continue
                prop = {"description": param.get("description", "")}
                if param.get("type") in _DEMO_TYPES:
                    prop["type"] = _DEMO_TYPES[param["type"]]
                props[param["name"]] = prop
                if param.get("required"):
                    required.append(param["name"])
            function["parameters"] = {"type": "object", "properties": props, "required": required}
        out.append({"type": "function", "function": function})
    return out


def validate_character(character) -> dict:
    """CharacterGLM profile -> {"bot_name", "bot_info", "user_name", "user_info"} (other keys ignored)."""
    if not isinstance(character, Mapping):
        raise InvalidParameterError("character", character,
                                    "must be an object with bot_name, bot_info and optional user_name, user_info")
    out = {}
    for key, required in (("bot_name", True), ("bot_info", True), ("user_name", False), ("user_info", False)):
        value = character.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidParameterError(f"character.{key}", value, "must be a string")
        if required and not (value or "").strip():
            what = "the name of the role the model plays" if key == "bot_name" else "the persona of that role"
            raise InvalidParameterError(f"character.{key}", value, f"is required and must be non-empty: {what}")
        out[key] = value or ""
    out["user_name"] = out["user_name"] or DEFAULT_USER_NAME
    return out


def persona_system_prompt(character: dict) -> str:
    """A system message describing the persona, for formats that have no native character profile."""
    bot, user = character["bot_name"], character["user_name"]
    lines = [f"你将扮演{bot}，与{user}对话。请始终以{bot}的身份回复。", f"关于{bot}的信息：{character['bot_info']}"]
    if character["user_info"]:
        lines.append(f"关于{user}的信息：{character['user_info']}")
    return "\n".join(lines)
