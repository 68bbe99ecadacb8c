"""Grammars for chat outputs (llguidance's Lark dialect, see engine/structured.py): an answer held to a
`response_format`, and tool calls written in each format's own syntax with arguments held to the tool's JSON
schema. The chat-serving layer combines them: a forced call is the calls grammar alone; `tool_choice: auto`
with a JSON `response_format` is "a call or a JSON answer".

The call shapes (spec sections 2.4, 4.4 and the Qwen template):
- Hermes/Qwen: `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, several separated by "\\n".
- Bare JSON (templates with JSON tool calls but no tags, e.g. Llama 3): `{"name": "f", "parameters": {...}}`.
- GLM-4: the segment's metadata line is the name, the body the JSON arguments; further calls follow a new
  <|assistant|> segment.
- ChatGLM3: the name, then a python fence holding `tool_call(k=v, ...)` with Python literals (booleans as
  True/False); the code interpreter's body is the code itself.
SentencePiece models (ChatGLM3) write a space before each separately encoded piece, so the GLM shapes allow
one where a new piece starts. Knows nothing of tokens or the engine.
"""

from __future__ import annotations

import keyword
from collections.abc import Mapping

from ..engine.structured import json_rule, lark_string
from ..errors import InvalidParameterError

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def answer_body(response_format, field: str = "response_format") -> str | None:
    """The Lark expression an answer must match for this `response_format` (None: free text). Raises
    InvalidParameterError naming the field for anything else."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidParameterError(field, response_format, 'must be an object such as {"type": "json_object"}')
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise InvalidParameterError(f"{field}.type", kind, f"must be one of {', '.join(RESPONSE_FORMATS)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_rule({"type": "object"}, field)
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidParameterError(f"{field}.json_schema", spec, 'is required with type "json_schema": '
                                    '{"name": ..., "schema": {...}}')
    schema = spec.get("schema")
    if schema is None:  # OpenAI allows a schema-less json_schema: any JSON object
        schema = {"type": "object"}
    if not isinstance(schema, (Mapping, bool)):
        raise InvalidParameterError(f"{field}.json_schema.schema", schema, "must be a JSON schema object")
    return json_rule(dict(schema) if isinstance(schema, Mapping) else schema, f"{field}.json_schema.schema")


def grammar(calls: str | None, answer: str | None) -> str | None:
    """A whole-output grammar from a calls grammar (rules defining `calls`) and/or an answer rule."""
    if calls is None and answer is None:
        return None
    lines = []
    if calls is not None and answer is not None:
        lines += ["start: calls | answer", f"answer: {answer}", calls]
    elif calls is not None:
        lines += ["start: calls", calls]
    else:
        lines += [f"start: {answer}"]
    return "\n".join(lines) + "\n"


def _params(tool: dict) -> dict:
    """A tool's parameters schema (json_rule closes its objects: undeclared arguments are not written)."""
    params = tool["function"].get("parameters")
    return params if isinstance(params, Mapping) else {"type": "object", "properties": {}}


def _calls(alternatives: list[str], separator: str | None) -> str:
    """`calls` as one call (or, with a separator, several) out of per-tool call expressions."""
    lines = [f"call_{i}: {expr}" for i, expr in enumerate(alternatives)]
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(alternatives))))
    lines.append("calls: call" + (f" ({separator} call)*" if separator else ""))
    return "\n".join(lines)


def hermes_calls(tools: list[dict], parallel: bool) -> str:
    alternatives = [
        lark_string('<tool_call>\n{"name": ' + lark_json_name(t) + ', "arguments": ') + " "
        + json_rule(_params(t), "tools") + " " + lark_string("}\n</tool_call>") for t in tools]
    return _calls(alternatives, lark_string("\n") if parallel else None)


def bare_json_calls(tools: list[dict]) -> str:
    alternatives = [lark_string('{"name": ' + lark_json_name(t) + ', "parameters": ') + " "
                    + json_rule(_params(t), "tools") + ' "}"' for t in tools]
    return _calls(alternatives, None)


def glm4_calls(tools: list[dict], parallel: bool, segment_id: int) -> str:
    alternatives = ['" "? ' + lark_string(t["function"]["name"] + "\n") + " " + json_rule(_params(t), "tools")
                    for t in tools]
    return _calls(alternatives, f"<[{segment_id}]>" if parallel else None)


def chatglm3_calls(tools: list[dict], parallel: bool, segment_id: int, interpreter: str) -> str:
    alternatives = []
    for t in tools:
        name = t["function"]["name"]
        head = '" "? ' + lark_string(name + "\n") + ' " "? ' + lark_string("```python\n")
        if name == interpreter:  # the code itself, not a tool_call(...) line
            alternatives.append(head + r' /[^`]+/ ' + lark_string("\n```"))
        else:
            alternatives.append(head + ' "tool_call(" ' + python_kwargs(_params(t)) + ' ' + lark_string(")\n```"))
    return _calls(alternatives, f"<[{segment_id}]>" if parallel else None)


def lark_json_name(tool: dict) -> str:
    """The tool name as it appears inside the JSON text (a JSON string)."""
    import json

    return json.dumps(tool["function"]["name"], ensure_ascii=False)


def python_kwargs(schema: dict) -> str:
    """`k=v, ...` for a JSON schema of an object: required properties first, then optional ones, each once and
    in schema order. Values are JSON (a Python literal too) except booleans and null (True/False/None); names
    that cannot be keywords go in one `**{...}` (as format_python_tool_call writes them). Empty if none."""
    props = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
    if any(not (k.isidentifier() and not keyword.iskeyword(k)) for k in props):
        return '("**" ' + json_rule(schema, "tools") + ")?"
    required = [k for k in props if k in set(schema.get("required") or [])]
    optional = [k for k in props if k not in required]
    items = {k: lark_string(k + "=") + " " + _python_value(props[k]) for k in props}
    sep = '", "'
    if required:
        return " ".join([f" {sep} ".join(items[k] for k in required)] + [f"({sep} {items[k]})?" for k in optional])
    if not optional:
        return '""'
    chains = [" ".join([items[k]] + [f"({sep} {items[o]})?" for o in optional[i + 1:]])
              for i, k in enumerate(optional)]
    return "(" + " | ".join(f"({c})" for c in chains) + ")?"


# A single-quoted Python string, as repr() writes it (ChatGLM3 was trained on both quote styles)
PY_STRING = r"""/'([^'\\\n]|\\.)*'/"""


def _python_value(schema) -> str:
    if isinstance(schema, Mapping):
        if schema.get("type") == "boolean":
            return '("True" | "False")'
        if schema.get("type") == "null":
            return '"None"'
        if schema.get("type") == "string" and not {"enum", "const", "pattern", "format", "minLength",
                                                   "maxLength"} & set(schema):
            return f"({json_rule(schema, 'tools')} | {PY_STRING})"
    return json_rule(schema if isinstance(schema, (Mapping, bool)) else {}, "tools")
