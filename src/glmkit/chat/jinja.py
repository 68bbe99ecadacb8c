"""Any model with a Jinja chat template (Qwen, Llama, GLM-4 -hf ...): rendered like Hugging Face's
`apply_chat_template` in a sandbox, then tokenized so that message contents can never become special ids.

Injection safety: every string in the messages and tools that spells a special token (contents, tool-call
arguments, tool descriptions; not dict keys) is replaced by a unique sentinel in a second rendering, which
shows where those strings sit; the real rendering is then matched piece by piece (allowing a template to trim
a content, and tojson to escape a string). Template text is split on special-token strings (placed as ids);
everything else, protected strings included, is encoded in runs between them, so the ids equal HF's for
benign input. If the template transforms such strings otherwise, assistant contents are given up first, and
last of all the whole text goes through `encode_with_special_tokens` (unsafe; logged).
Tool calls are parsed in the Qwen/Hermes `<tool_call>` style, or, with tools declared, as a reply that is
nothing but a JSON call to a declared tool (what small Qwen models often write). Knows nothing of the engine.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import datetime

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidParameterError, ModelLoadError
from .base import ChatFormat
from .grammars import bare_json_calls, hermes_calls
from .messages import normalize_messages, normalize_tools
from .tool_calls import (TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ParsedOutput, declared_tool_names,
                         parse_bare_json_tool_calls, parse_hermes_tool_calls)

log = logging.getLogger("glmkit")

STOP_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")
TEMPLATE_ROLES = {"observation": "tool", "function": "tool"}  # what HF-style templates call tool results


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (marks assistant tokens for training); renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InvalidParameterError("chat_template", f"line {e.lineno}", f"is not a valid Jinja template: {e}")


def _named_templates(source) -> dict[str, str]:
    """tokenizer_config's chat_template is a string or a list of {"name", "template"} (e.g. "tool_use")."""
    if isinstance(source, str):
        return {"default": source}
    return {item["name"]: item["template"] for item in source}


def template_message(message: dict) -> dict:
    """A normalized message in the shape HF templates read (tool-call arguments as objects, as HF passes)."""
    out = {"role": TEMPLATE_ROLES.get(message["role"], message["role"]), "content": message["content"]}
    for key in ("name", "tool_call_id", "metadata"):
        if message.get(key):
            out[key] = message[key]
    if "tool_calls" in message:
        out["tool_calls"] = [{"id": c["id"], "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": json.loads(c["function"]["arguments"])}}
                             for c in message["tool_calls"]]
    return out


def _variants(text: str) -> list[str]:
    """What a template may have made of a string: itself, trimmed (Llama-3 templates `| trim` contents), or
    escaped inside a JSON string (tools and tool-call arguments go through `tojson`)."""
    return list(dict.fromkeys([text, text.strip(), text.rstrip(), text.lstrip(),
                               json.dumps(text, ensure_ascii=False)[1:-1], json.dumps(text)[1:-1]]))


class JinjaFormat(ChatFormat):
    name = "jinja"
    hidden_spans = ((TOOL_CALL_OPEN, TOOL_CALL_CLOSE),)  # Hermes blocks never show while streaming

    def __init__(self, tokenizer, eos_token_ids: list[int] | None = None, template: str | None = None):
        source = template if template is not None else getattr(tokenizer, "chat_template", None)
        if not source:
            raise ModelLoadError("the jinja chat format needs a chat template, but the tokenizer has none; pass "
                                 "one (chat_template=...) or pick a built-in format with chat_format=")
        self.templates = {name: compile_template(text) for name, text in _named_templates(source).items()}
        self.template_source = source if isinstance(source, str) else "\n".join(
            str(t) for t in _named_templates(source).values())
        super().__init__(tokenizer, eos_token_ids)
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def _format_stop_ids(self) -> list[int]:
        specials = self.tokenizer.special_tokens
        return [self.tokenizer.eos_token_id] + [specials[t] for t in STOP_TOKEN_NAMES if t in specials]

    # -- rendering ---------------------------------------------------------------------------------------
    def render_text(self, messages, tools=None, add_generation_prompt: bool = True) -> str:
        """The template's text for a conversation (for inspecting prompts; `render` gives the ids)."""
        template, msgs, variables = self._prepare(normalize_messages(messages), normalize_tools(tools),
                                                  add_generation_prompt)
        return self._render_real(template, msgs, variables)

    def _prepare(self, messages, tools, add_generation_prompt):
        if tools is None:  # ChatGLM3-shaped history carries its tools on a system message
            for i, m in enumerate(messages):
                if "tools" in m and tools is None:
                    tools = normalize_tools(m["tools"], field=f"messages[{i}].tools")
        template = self.templates.get("tool_use" if tools else "default") or next(iter(self.templates.values()))
        variables = {"tools": tools, "add_generation_prompt": add_generation_prompt,
                     "bos_token": getattr(self.tokenizer, "bos_token", None) or "",
                     "eos_token": getattr(self.tokenizer, "eos_token", None) or ""}
        return template, [template_message(m) for m in messages], variables

    @staticmethod
    def _render_real(template, msgs, variables) -> str:
        try:
            return template.render(messages=msgs, **variables)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError) as e:
            raise InvalidParameterError("messages", f"{len(msgs)} messages",
                                        f"the model's chat template rejected them: {e}")

    def _render(self, messages, tools, character, add_generation_prompt):
        template, msgs, variables = self._prepare(messages, tools, add_generation_prompt)
        real = self._render_real(template, msgs, variables)
        if self._special_re is None:
            return self.tokenizer.encode(real)
        # Assistant contents are given up first: some templates rewrite them (e.g. dropping reasoning).
        for protect_assistant in (True, False):
            ids = self._encode_protected(template, msgs, variables, real, protect_assistant)
            if ids is not None:
                return ids
        log.warning("chat template rewrites message contents; tokenizing its output as a whole, so special-token "
                    "strings inside messages are not neutralized")
        return self.tokenizer.encode_with_special_tokens(real)

    def _mark(self, value, originals: list[str], nonce: str):
        """Copy of a message/tools value with every string that spells a special token replaced by a
        sentinel (only those: other strings tokenize the same either way)."""
        if isinstance(value, str):
            if not self._special_re.search(value):
                return value
            originals.append(value)
            return f"GLMKIT{nonce}X{len(originals) - 1}Z"  # alphanumeric: survives escaping and trim
        if isinstance(value, dict):
            return {k: self._mark(v, originals, nonce) for k, v in value.items()}
        if isinstance(value, list):
            return [self._mark(v, originals, nonce) for v in value]
        return value

    def _encode_protected(self, template, msgs, variables, real: str, protect_assistant: bool) -> list[int] | None:
        nonce, originals = secrets.token_hex(8), []
        marked = []
        for m in msgs:
            keep = {"content": m["content"]} if m["role"] == "assistant" and not protect_assistant else {}
            marked.append({**self._mark(m, originals, nonce), **keep})
        marked_vars = {**variables, "tools": self._mark(variables["tools"], originals, nonce)}
        if not originals:
            return self._encode_pieces([("template", real)])
        try:
            rendered = template.render(messages=marked, **marked_vars)
        except Exception:  # the template treats sentinels differently from the real strings
            return None
        parts = re.split(f"GLMKIT{nonce}X(\\d+)Z", rendered)  # [template, index, template, index, ...]
        if not real.startswith(parts[0]):
            return None
        pieces, pos = [("template", parts[0])], len(parts[0])
        for k in range(1, len(parts), 2):
            after, last = parts[k + 1], k + 2 == len(parts)
            for candidate in _variants(originals[int(parts[k])]):
                end = pos + len(candidate) + len(after)
                if real.startswith(candidate + after, pos) and (not last or end == len(real)):
                    break
            else:
                return None
            pieces += [("content", candidate), ("template", after)]
            pos = end
        return self._encode_pieces(pieces) if pos == len(real) else None

    def _encode_pieces(self, pieces: list[tuple[str, str]]) -> list[int]:
        """Special-token strings in template pieces become ids; all other text, contents included, is encoded
        in runs between special tokens, as a tokenizer splitting on added tokens would."""
        ids, run = [], ""
        for kind, piece in pieces:
            parts = [piece] if kind == "content" or self._special_re is None else self._special_re.split(piece)
            for j, part in enumerate(parts):
                if j % 2:
                    ids += self.tokenizer.encode(run) if run else []
                    ids.append(self.tokenizer.special_tokens[part])
                    run = ""
                else:
                    run += part
        return ids + (self.tokenizer.encode(run) if run else [])

    # -- output ------------------------------------------------------------------------------------------
    def call_grammar(self, tools: list[dict], parallel: bool) -> str | None:
        source = self.template_source or ""
        if "<tool_call>" in source:
            return hermes_calls(tools, parallel)
        if "tools" in source:  # a template that shows tools but has no call tags: calls are bare JSON objects
            return bare_json_calls(tools)
        return None

    def parse(self, output_ids: list[int], tools=None) -> ParsedOutput:
        text = self.tokenizer.decode(output_ids)
        content, calls = parse_hermes_tool_calls(text)
        if not calls and tools:
            bare = parse_bare_json_tool_calls(text, declared_tool_names(tools))
            if bare:
                return ParsedOutput(content="", tool_calls=bare)
        return ParsedOutput(content=content.strip(), tool_calls=calls)

    def hides_span(self, span: str) -> bool:
        return bool(parse_hermes_tool_calls(span)[1])  # a malformed block stays text, as in `parse`
