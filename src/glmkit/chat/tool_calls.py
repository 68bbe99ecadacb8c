"""Tool calls: the `ToolCall`/`ParsedOutput` types and the three text shapes models use to ask for one.

- ChatGLM3: a python fence holding `tool_call(k=v, ...)`. Parsed with `ast.parse` and `ast.literal_eval` only;
  model output is never passed to `eval`/`exec`.
- GLM-4: the body is a JSON object (the tool name travels in the segment's metadata line).
- Qwen/Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks inside the text (and, for
  declared tools only, a reply that is just such a JSON object, as small Qwen models write).

Every parser returns None (or leaves the text alone) for anything it cannot read; callers then keep the text
as plain content. Knows nothing of tokens, roles or which model produced the text.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
import secrets
import string
from dataclasses import dataclass, field

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """OpenAI-style id, e.g. "call_" + 24 random alphanumerics (as the GLM-4 demo server makes them)."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object text, ensure_ascii=False
    id: str = field(default_factory=new_call_id)


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def dump_arguments(args: dict) -> str | None:
    """JSON text of a call's arguments, or None when a value has no JSON form (sets, bytes, NaN ...)."""
    try:
        return json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None


def declared_tool_names(tools) -> set[str]:
    """Names in an OpenAI tools list (also tolerates bare function dicts)."""
    names = set()
    for tool in tools or []:
        if isinstance(tool, dict):
            function = tool.get("function", tool)
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                names.add(function["name"])
    return names


# --- ChatGLM3: ```python\ntool_call(k=v)\n``` -------------------------------------------------------------

# The closing fence is optional: a generation that stops at <|observation|> may have dropped it.
_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)(?:\n?```|$)", re.S)


def fenced_body(text: str) -> str | None:
    match = _FENCE_RE.search(text)
    return match.group(1) if match else None


def parse_python_tool_call(name: str, body: str) -> ToolCall | None:
    """`tool_call(a=1, b="x")` (inside a python fence or bare) -> ToolCall, else None. Never evaluates code."""
    source = fenced_body(body)
    source = (body if source is None else source).strip()
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args:  # positional arguments have no names to map to parameters
        return None
    args: dict = {}
    for kw in call.keywords:
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
        if kw.arg is not None:
            args[kw.arg] = value
        elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
            args.update(value)  # `**{"not-an-identifier": 1}`, the form format_python_tool_call writes
        else:
            return None
    arguments = dump_arguments(args)
    return ToolCall(name=name, arguments=arguments) if arguments is not None else None


def format_python_tool_call(args: dict) -> str:
    """The fenced `tool_call(...)` text ChatGLM3 was trained on, for calls in the conversation history.

    Values come from JSON, so `repr` gives valid Python literals; keys that cannot be keyword names go into
    one `**{...}` argument, which parse_python_tool_call reads back.
    """
    parts, extra = [], {}
    for key, value in args.items():
        if key.isidentifier() and not keyword.iskeyword(key):
            parts.append(f"{key}={value!r}")
        else:
            extra[key] = value
    if extra:
        parts.append(f"**{extra!r}")
    return "```python\ntool_call(" + ", ".join(parts) + ")\n```"


# --- GLM-4: the body is a JSON object ------------------------------------------------------------------

def parse_json_tool_call(name: str, body: str) -> ToolCall | None:
    try:
        args = json.loads(body.strip())
    except (ValueError, RecursionError):
        return None
    if not isinstance(args, dict):
        return None
    arguments = dump_arguments(args)
    return ToolCall(name=name, arguments=arguments) if arguments is not None else None


# --- Qwen/Hermes: <tool_call>{...}</tool_call> ---------------------------------------------------------

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# An unclosed block at the very end still counts: the model may stop before writing the closing tag.
_HERMES_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


def _call_from_object(obj) -> ToolCall | None:
    """{"name": ..., "arguments": {...}} (or "parameters", or arguments as JSON text) -> ToolCall."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    arguments = dump_arguments(args)
    return ToolCall(name=obj["name"], arguments=arguments) if arguments is not None else None


def _hermes_call(payload: str) -> ToolCall | None:
    try:
        return _call_from_object(json.loads(payload.strip()))
    except (ValueError, RecursionError):
        return None


def parse_hermes_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Text with <tool_call> blocks -> (remaining text, calls). Malformed blocks stay in the text."""
    calls, kept, pos = [], [], 0
    for match in _HERMES_RE.finditer(text):
        call = _hermes_call(match.group(1))
        if call is None:
            continue
        kept.append(text[pos:match.start()])
        pos = match.end()
        calls.append(call)
    kept.append(text[pos:])
    return "".join(kept), calls


_JSON_FENCE_RE = re.compile(r"\A```(?:json)?[ \t]*\n(.*?)\n?```\Z", re.S)
_DECODER = json.JSONDecoder()


def _leading_calls(text: str, names: set[str]) -> tuple[list[ToolCall], str]:
    """The declared-tool call objects (or lists of them) at the start of `text`, one after another with only
    whitespace between, and the text after the last one."""
    calls, pos = [], 0
    while True:
        start = len(text) - len(text[pos:].lstrip())
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            return calls, text[start:]
        items = obj if isinstance(obj, list) and obj else [obj]
        found = [_call_from_object(item) if isinstance(item, dict) and item.get("name") in names else None
                 for item in items]
        if None in found:
            return calls, text[start:]
        calls += found
        pos = end


def parse_bare_json_tool_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """Small Qwen models often answer a tool call without the tags: the whole reply is JSON call objects (one,
    a list, or several one after another), maybe in a ```json fence. Accepted only for declared tool names,
    so ordinary JSON answers stay text."""
    text = text.strip()
    fence = _JSON_FENCE_RE.match(text)
    calls, rest = _leading_calls(fence.group(1) if fence else text, names)
    return calls if calls and not rest.strip() else None


def leading_bare_json_tool_calls(text: str, names: set[str]) -> tuple[list[ToolCall], str]:
    """The complete call objects a reply starts with, and what follows them (prose, or an object cut short by
    the token limit): for a caller that knows the reply is a turn of calls (an agent whose model writes its
    calls as text after the first round)."""
    return _leading_calls(text, names)
