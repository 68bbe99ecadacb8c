"""Python functions as tools, and calling a tool safely with a model's arguments.

`@tool` reads a typed function (hints, defaults, docstring) and attaches a `Tool` to it as `fn.tool`; the
function itself is returned unchanged, so it stays callable (and testable) as plain Python. `call_tool` turns a
model's arguments (JSON text or a dict) into an `Observation` and never raises: unparsable JSON, arguments the
schema refuses, an exception, a timeout all become error observations whose text says what to fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import hashlib
import importlib.util
import json
import re
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import jsonschema

from ..errors import excerpt
from .base import Observation, Tool
from .signatures import ToolDefinitionError, check_name, function_tool

MAX_OBSERVATION_CHARS = 8000


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         timeout_s: float = 30.0):
    """`@tool` or `@tool(name=..., description=..., timeout_s=...)`: attach `function_tool(fn, ...)` to the
    function as `fn.tool` and return the function itself."""
    def attach(fn: Callable) -> Callable:
        fn.tool = function_tool(fn, name=name, description=description, timeout_s=timeout_s)
        return fn
    return attach(fn) if fn is not None else attach


def from_schema(spec: dict, fn: Callable, *, timeout_s: float = 30.0) -> Tool:
    """A Tool from an OpenAI definition (`{"type": "function", "function": {...}}` or the inner
    `{"name", "description", "parameters"}`) and the callable that implements it, called as `fn(**arguments)`."""
    function = spec.get("function", {}) if spec.get("type") == "function" else spec
    name = check_name(function.get("name"))
    if not callable(fn):
        raise ToolDefinitionError(f"tool {name}: {fn!r} is not callable")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as e:
        raise ToolDefinitionError(f"tool {name}: parameters are not a valid JSON schema: {e.message}") from e
    return Tool(name, function.get("description") or "", parameters, fn, timeout_s)


def as_tool(obj: Any) -> Tool:
    """A Tool itself, the Tool of an @tool function, or a new Tool for a plain function."""
    if isinstance(obj, Tool):
        return obj
    if isinstance(getattr(obj, "tool", None), Tool):
        return obj.tool
    if callable(obj):
        return function_tool(obj)
    raise TypeError(f"not a tool: {obj!r} (give a Tool or a function)")


def call_tool(tool: Tool, arguments: str | dict | None = None, *,
              max_chars: int = MAX_OBSERVATION_CHARS) -> Observation:
    """Call `tool` with a model's arguments and return what the model reads back; never raises.

    The call runs in a daemon worker thread bounded by `tool.timeout_s`. A Python function cannot be killed: on a
    timeout the thread is abandoned (it may run on, and its result is dropped), so tools that can hang on I/O
    should bound it themselves. The text is capped at about `max_chars` characters, head and tail kept."""
    try:
        args = parse_arguments(arguments)
    except ValueError as e:
        return Observation(f"{tool.name}: {e}", error=True)
    problem = check_arguments(tool, args)
    if problem is not None:
        return Observation(problem, error=True)
    observation = _run(tool, args)
    return dataclasses.replace(observation, text=cap_text(observation.text, max_chars))


def parse_arguments(arguments: str | dict | None) -> dict:
    """The arguments object: a dict as is, JSON text parsed (also when a model encoded it twice); nothing or
    blank text is no arguments. Raises ValueError saying what is wrong."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else arguments
        if isinstance(value, str) and value.lstrip().startswith("{"):  # a model that encoded the object twice
            value = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"arguments are not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                         f"{excerpt(arguments)}; send one JSON object such as {{\"name\": value}}") from None
    if not isinstance(value, dict):
        raise ValueError(f"arguments must be a JSON object of named arguments, not {_show(value)}")
    return dict(value)


def check_arguments(tool: Tool, args: dict) -> str | None:
    """None when `args` fit `tool.parameters`, else a short message naming each wrong field (at most three),
    its value and what was expected, followed by the arguments the tool takes."""
    try:
        reason = _schema_problem(json.dumps(tool.parameters, sort_keys=True, default=str))
        if reason is None:
            checker = jsonschema.validators.validator_for(tool.parameters)(tool.parameters)
            errors = sorted(checker.iter_errors(args), key=jsonschema.exceptions.relevance)
    except Exception as e:  # an unresolvable $ref, say: the tool's fault, not the model's
        reason = str(e).splitlines()[0]
    if reason is not None:
        return f"{tool.name} cannot be called: its parameters schema is invalid ({reason})"
    if not errors:
        return None
    problems = "; ".join(_describe(e) for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return f"invalid arguments for {tool.name}: {problems}{more}. It takes: {_signature(tool.parameters)}"


def cap_text(text: str, max_chars: int = MAX_OBSERVATION_CHARS) -> str:
    """`text` cut to about `max_chars` characters: the first three quarters and the last quarter kept (a result's
    end often matters: totals, the last error), with a note of how much was cut."""
    if len(text) <= max_chars:
        return text
    head = max_chars * 3 // 4
    tail = max_chars - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut:,} of {len(text):,} characters cut ...]\n{text[len(text) - tail:]}"


class Toolbox:
    """Tools by name: what the model is offered (`specs()`) and how its calls are answered (`call`)."""

    def __init__(self, tools=()):
        self._tools: dict[str, Tool] = {}
        self.add(*tools)

    def add(self, *tools) -> None:
        """Add Tools, @tool functions or plain functions; two tools of one name are an error."""
        for obj in tools:
            t = as_tool(obj)
            if t.name in self._tools:
                raise ToolDefinitionError(f"two tools are named {t.name!r}; rename one with @tool(name=...)")
            self._tools[t.name] = t

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def specs(self) -> list[dict]:
        """The OpenAI `tools` list."""
        return [t.spec() for t in self._tools.values()]

    def call(self, name: str, arguments: str | dict | None = None) -> Observation:
        """`call_tool` on the tool called `name`; an unknown name is an error observation listing the tools."""
        t = self._tools.get(name)
        if t is not None:
            return call_tool(t, arguments)
        close = difflib.get_close_matches(str(name), self._tools, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return Observation(f"there is no tool named {excerpt(name)}.{hint} Available tools: "
                           f"{', '.join(self._tools) or '(none)'}", error=True)


def load_tools_file(path: str | Path) -> list[Tool]:
    """Import a user's Python file and return its tools: every @tool function (and Tool object) at its top level,
    in order. A file that is missing, fails to import or defines no tool is a ToolDefinitionError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ToolDefinitionError(f"tools file {path} does not exist")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"_glmkit_tools_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None:
        raise ToolDefinitionError(f"tools file {path} is not a Python file (name it *.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling in the file look themselves up there
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[module_name]
        raise ToolDefinitionError(f"cannot load tools from {path}: {type(e).__name__}: {e}") from e
    tools: list[Tool] = []
    for value in vars(module).values():
        found = value if isinstance(value, Tool) else getattr(value, "tool", None) if callable(value) else None
        if isinstance(found, Tool) and all(found is not t for t in tools):
            tools.append(found)
    if not tools:
        raise ToolDefinitionError(f"{path} defines no tools: decorate functions with @tool "
                                  "(from glmkit.tools.registry import tool)")
    return tools


# --- calling -------------------------------------------------------------------------------------------

def _run(tool: Tool, args: dict) -> Observation:
    outcome: dict[str, Any] = {}

    def work():  # the result is turned into text here too, so a huge or odd value is also under the timeout
        try:
            outcome["observation"] = _to_observation(tool.fn(**args))
        except BaseException as e:  # SystemExit from a tool too; this thread must not die silently
            outcome["error"] = e

    worker = threading.Thread(target=work, name=f"tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(tool.timeout_s)
    if worker.is_alive():
        return Observation(f"{tool.name} did not finish within {tool.timeout_s:g} s and was abandoned; "
                           "try a smaller request", error=True)
    if "error" in outcome:
        e = outcome["error"]
        return Observation(f"{tool.name} failed: {type(e).__name__}{f': {e}' if str(e) else ''}", error=True)
    return outcome["observation"]


@functools.lru_cache(maxsize=256)
def _schema_problem(schema_json: str) -> str | None:
    """Why a parameters schema (as JSON text) is not a valid JSON schema, or None; cached, as checking a schema
    against its metaschema costs about 10 ms and a tool's schema does not change between calls."""
    schema = json.loads(schema_json)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return e.message
    return None


def _to_observation(value) -> Observation:
    if isinstance(value, Observation):
        return value
    if isinstance(value, str):
        return Observation(value)
    return Observation(json.dumps(value, ensure_ascii=False, default=_json_default))


def _json_default(value):
    """Enum members as their values, sets as sorted lists, anything else (dates, paths) as str."""
    if isinstance(value, enum.Enum):
        return value.value
    return sorted(value, key=repr) if isinstance(value, (set, frozenset)) else str(value)


def _describe(error: jsonschema.ValidationError) -> str:
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    where = f"argument {field!r}" if field else "arguments"
    if error.validator == "required":
        missing = ", ".join(repr(n) for n in error.validator_value if n not in error.instance)
        return f"{where} lacks required key {missing}" if field else f"missing required argument {missing}"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        extra = ", ".join(repr(k) for k in error.instance if k not in error.schema.get("properties", {}))
        return f"{where} has unexpected key {extra}" if field else f"unexpected argument {extra}"
    if error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{where} = {_show(error.instance)} should be {expected}"
    if error.validator == "enum":
        return f"{where} = {_show(error.instance)} should be one of {', '.join(map(_show, error.validator_value))}"
    return f"{where} = {_show(error.instance)}: {error.message[:200]}"


def _show(value) -> str:
    """A value as the model wrote it (JSON), cut to about 100 characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 100 else f"{text[:100]}... ({len(text)} characters)"


def _signature(parameters: dict) -> str:
    required = set(parameters.get("required", []))
    parts = []
    for name, schema in parameters.get("properties", {}).items():
        schema = schema if isinstance(schema, dict) else {}
        kind = ("|".join(map(_show, schema["enum"])) if "enum" in schema
                else "|".join(schema["type"]) if isinstance(schema.get("type"), list) else schema.get("type", "any"))
        parts.append(f"{name}: {kind}{' (required)' if name in required else ''}")
    return ", ".join(parts) or "no arguments"
