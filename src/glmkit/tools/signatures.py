"""A typed Python function's tool schema: names, parameters from hints and defaults, descriptions from
`Annotated` or the docstring (Google, NumPy and Sphinx styles), and the conversions that turn JSON values back
into the declared types (enums, tuples, integral floats) before the call. registry.py builds on it.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
import re
import types
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin

from ..errors import GlmkitError
from .base import Tool

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


class ToolDefinitionError(GlmkitError, ValueError):
    """A tool cannot be made as written: a bad name, an unsupported parameter type, a tools file that fails."""


def check_name(name: Any) -> str:
    """`name` if it is a valid tool name (OpenAI's rule, dots allowed for namespaced MCP tools)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ToolDefinitionError(f"tool name {name!r} is invalid: use 1 to 64 letters, digits, '_', '.' or '-' "
                                  "(e.g. @tool(name=\"get_weather\"))")
    return name


def function_tool(fn: Callable, *, name: str | None = None, description: str | None = None,
                  timeout_s: float = 30.0) -> Tool:
    """A Tool for a typed function. Parameters come from the signature: a default makes one optional;
    `Annotated[type, "description"]` (optionally `, required` as ChatGLM3's register_tool, a dict merged into the
    schema, or an object with a `description` such as pydantic's Field) describes one, else the docstring's
    Args/Parameters section does. The docstring's first paragraph is the tool's description. (With a dict, put
    Optional inside: `Annotated[int | None, {...}]`; Python cannot put an Annotated holding a dict in a Union.)"""
    name = check_name(name if name is not None else getattr(fn, "__name__", None))
    if not timeout_s > 0:
        raise ToolDefinitionError(f"tool {name}: timeout_s={timeout_s!r} must be a positive number of seconds")
    summary, arg_docs = parse_docstring(inspect.getdoc(fn))
    try:
        hints = inspect.get_annotations(fn, eval_str=True)  # unlike get_type_hints, adds no Optional on 3.10
    except Exception as e:
        raise ToolDefinitionError(f"tool {name}: cannot read its type hints ({type(e).__name__}: {e})") from e
    properties, required, converters, extra_allowed = {}, [], {}, False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            extra_allowed = True
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL):
            raise ToolDefinitionError(f"tool {name}: parameter {p.name!r} cannot be passed by name; "
                                      "tools take keyword arguments only")
        base, info, marked_required, extra = _unwrap_annotated(hints.get(p.name, Any))
        schema = {**_schema(base, f"tool {name}, parameter {p.name!r}"), **extra}
        if info or arg_docs.get(p.name):
            schema["description"] = info or arg_docs[p.name]
        has_default = p.default is not p.empty
        if has_default and _jsonable(p.default):
            schema["default"] = p.default.value if isinstance(p.default, enum.Enum) else p.default
        if marked_required is False and not has_default:
            raise ToolDefinitionError(f"tool {name}: parameter {p.name!r} is marked not required but has no "
                                      "default; give it one (e.g. = None)")
        if marked_required or (marked_required is None and not has_default):
            required.append(p.name)
        properties[p.name] = schema
        if (convert := _converter(base)) is not None:
            converters[p.name] = convert
    parameters = {"type": "object", "properties": properties, "required": required,
                  "additionalProperties": extra_allowed}
    return Tool(name, summary if description is None else description, parameters,
                _with_conversions(fn, converters), timeout_s)



_ARGS_HEADER = re.compile(r"(Args|Arguments|Parameters|Params|Keyword Args)\s*:?")
_ENTRY = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*(?::\s*(.*))?")
_SPHINX_PARAM = re.compile(r":param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a docstring: its first paragraph, and the parameter entries
    of a Google (`Args:`), NumPy (`Parameters` over dashes) or Sphinx (`:param x:`) section."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary = []
    for line in lines:
        if not line.strip() or _ARGS_HEADER.fullmatch(line.strip()) or line.startswith(":"):
            break
        summary.append(line.strip())
    params: dict[str, str] = {}
    in_section, numpy, entry_indent, current = False, False, 0, None
    for i, line in enumerate(lines):
        text, indent = line.strip(), len(line) - len(line.lstrip())
        underlined = i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) is not None
        if not text or re.fullmatch(r"-{3,}", text):
            continue
        if m := _SPHINX_PARAM.fullmatch(text):
            in_section, entry_indent, current = False, indent, m[1]
            params[current] = m[2].strip()
        elif indent == 0 and _ARGS_HEADER.fullmatch(text):
            in_section, numpy, entry_indent, current = True, underlined, None, None
        elif current and indent > entry_indent:
            params[current] = f"{params[current]} {text}".strip()
        elif in_section and (entry_indent is None or indent == entry_indent) and not underlined \
                and (m := _ENTRY.fullmatch(text)):
            entry_indent, current = indent, m[1]
            params[current] = "" if numpy else (m[2] or "").strip()
        else:
            in_section, current = False, None
    return " ".join(summary), {k: v for k, v in params.items() if v}


def _unwrap_annotated(hint) -> tuple[Any, str | None, bool | None, dict]:
    """(type, description, required flag, extra schema) from `Annotated[type, ...]` (also inside Optional)."""
    nullable = False
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        others = [a for a in get_args(hint) if a is not type(None)]
        if len(others) == 1 and get_origin(others[0]) is Annotated:
            hint, nullable = others[0], True
    if get_origin(hint) is not Annotated:
        return hint, None, None, {}
    base, *metadata = get_args(hint)
    description, required, extra = None, None, {}
    for item in metadata:
        if isinstance(item, str):
            description = item
        elif isinstance(item, bool):
            required = item
        elif isinstance(item, dict):
            extra.update(item)
        elif isinstance(getattr(item, "description", None), str):
            description = item.description
    return (base | None if nullable else base), description, required, extra


def _schema(tp, where: str) -> dict:
    if tp is Any:
        return {}
    if tp in _JSON_TYPES:
        return {"type": _JSON_TYPES[tp]}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_schema([member.value for member in tp])
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return _enum_schema(list(args))
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        inner = _schema(options[0], where) if len(options) == 1 else {"anyOf": [_schema(a, where) for a in options]}
        return _nullable(inner) if len(options) < len(args) else inner
    if tp in (list, set, frozenset, tuple) or origin in (list, set, frozenset):
        return {"type": "array", **({"items": _schema(args[0], where)} if args else {})}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema(args[0], where)}
        return {"type": "array", "prefixItems": [_schema(a, where) for a in args], "minItems": len(args),
                "maxItems": len(args)}
    if tp is dict or origin is dict:
        values = args[1] if len(args) == 2 else Any
        return {"type": "object", **({"additionalProperties": _schema(values, where)} if values is not Any else {})}
    raise ToolDefinitionError(f"{where}: unsupported type {tp!r}; use str, int, float, bool, list[...], "
                              "tuple[...], dict, Literal[...], an Enum, Optional[...] or Any")


def _enum_schema(values: list) -> dict:
    kinds = {_JSON_TYPES.get(type(v)) for v in values}
    return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 and None not in kinds else {"enum": values}


def _nullable(schema: dict) -> dict:
    if not schema:
        return schema
    if isinstance(schema.get("type"), str):
        schema = {**schema, "type": [schema["type"], "null"]}
        return {**schema, "enum": [*schema["enum"], None]} if "enum" in schema else schema
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    return {"anyOf": [schema, {"type": "null"}]}


def _converter(tp) -> Callable | None:
    """What turns a validated JSON value into the Python type the function declared (Enum members, tuples,
    ints sent as 3.0), or None when the JSON value already is it."""
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        tp = options[0] if len(options) == 1 else None
    if tp is int:
        return lambda v: int(v) if isinstance(v, float) else v
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    if tp is tuple or get_origin(tp) is tuple:
        return tuple
    return None


def _with_conversions(fn: Callable, converters: dict[str, Callable]) -> Callable:
    if not converters:
        return fn

    @functools.wraps(fn)
    def call(**kwargs):
        for key, convert in converters.items():
            if kwargs.get(key) is not None:
                kwargs[key] = convert(kwargs[key])
        return fn(**kwargs)
    return call


def _jsonable(value) -> bool:
    try:
        json.dumps(value.value if isinstance(value, enum.Enum) else value)
        return True
    except (TypeError, ValueError):
        return False
