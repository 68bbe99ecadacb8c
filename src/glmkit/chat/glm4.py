"""GLM-4-9B-chat: `[gMASK]<sop>`, an optional `<|system|>` tools block, then per message with non-empty content
`<|role|>` + encode(metadata + "\\n" + content), then `<|assistant|>` (spec 4.3).

Mirrors the checkpoint's Jinja template at token level: the text between two special tokens is encoded as
one piece (one `encode` call), and role tokens are placed as ids, so user text cannot forge a turn. Tool calls
are `<|assistant|>{name}\\n{json}` segments (spec 4.4). Only "function" tools are declared; a function tool
named `python` (the code interpreter) is also read, and written back, in the form GLM-4 was trained on for its
own python tool: `<|assistant|>python\\n` and a code fence, as `{"code": ...}`. The template's
simple_browser/cogview tools are not supported. Knows nothing of the engine.
"""

from __future__ import annotations

import json

from .base import SegmentedFormat
from .chatglm3 import ROLE_TOKENS, call_turns
from .grammars import glm4_calls
from .messages import normalize_tools
from .tool_calls import ToolCall, declared_tool_names, dump_arguments, fenced_body, parse_json_tool_call

TOOLS_SYSTEM_PROMPT = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                       "你的任务是针对用户的问题和要求提供适当的答复和支持。")
TOOLS_HEADER = "\n\n# 可用工具"
FUNCTION_FOOTER = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
PYTHON = "python"  # GLM-4's code-interpreter tool
PYTHON_TOOL_TEXT = ("当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook 环境中执行。\n"
                    "`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n`/mnt/data` 将会持久化存储你的文件。"
                    "在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，"
                    "这些在线内容的访问将不会成功。")


def tools_block(tools: list[dict]) -> str:
    """The text after `<|system|>` for a tools list, as transformers renders the checkpoint's template: its
    `tojson(indent=4)` (no key sorting, no ASCII escaping), and `trim_blocks`, which drops the first of the two
    newlines that follow `{% if tool['type'] == 'function' %}`, so each heading is `\n## name`. The code
    interpreter (a `python` function tool taking `code`) gets the template's own `python` block instead."""
    text = "\n" + TOOLS_SYSTEM_PROMPT + TOOLS_HEADER
    for tool in tools:
        function = tool["function"]
        if is_python_tool(function):  # the template's own block for its `python` tool
            text += f"\n## {PYTHON}\n\n{PYTHON_TOOL_TEXT}"
        else:
            text += f"\n## {function['name']}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}{FUNCTION_FOOTER}"
    return text


def is_python_tool(function: dict) -> bool:
    """A function tool named `python` whose one argument is `code`: the code interpreter."""
    properties = (function.get("parameters") or {}).get("properties")
    return function.get("name") == PYTHON and isinstance(properties, dict) and set(properties) == {"code"}


def python_call(body: str) -> ToolCall | None:
    """GLM-4's python turn: code in a fence (or bare) -> a `python` call with {"code": ...}."""
    code = fenced_body(body)
    code = (body if code is None else code).strip()
    arguments = dump_arguments({"code": code})
    return ToolCall(name=PYTHON, arguments=arguments) if code and arguments else None


def call_text(name: str, arguments: str) -> str:
    """A call in the history: the JSON arguments; a python call with only code, as GLM-4's own code fence."""
    if name == PYTHON:
        args = json.loads(arguments)
        if isinstance(args, dict) and set(args) == {"code"} and isinstance(args["code"], str):
            return "```python\n" + args["code"] + "\n```"
    return arguments


class GLM4Format(SegmentedFormat):
    name = "glm4"
    required_special_tokens = ("[gMASK]", "<sop>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                               "<|observation|>")

    def _format_stop_ids(self) -> list[int]:
        return [self.special("<|endoftext|>"), self.special("<|user|>"), self.special("<|observation|>")]

    def _render(self, messages, tools, character, add_generation_prompt):
        ids = [self.special("[gMASK]"), self.special("<sop>")]
        if tools:
            ids += [self.special("<|system|>")] + self.tokenizer.encode(tools_block(tools))
        for i, message in enumerate(messages):
            if "tools" in message:  # ChatGLM-shaped history: the tools ride on a system message
                message_tools = normalize_tools(message["tools"], field=f"messages[{i}].tools")
                if message_tools:
                    ids += [self.special("<|system|>")] + self.tokenizer.encode(tools_block(message_tools))
            if message["role"] == "assistant":
                turns = call_turns(message, call_text)
            else:
                turns = [(message["role"], message["metadata"], message["content"])]
            for role, metadata, content in turns:
                if content:  # the template skips items with empty content entirely
                    ids.append(self.special(ROLE_TOKENS[role]))
                    ids += self.tokenizer.encode(metadata + "\n" + content)
        if add_generation_prompt:
            ids.append(self.special("<|assistant|>"))
        return ids

    def call_grammar(self, tools: list[dict], parallel: bool) -> str:
        return glm4_calls(tools, parallel, self.special(self.segment_token))

    def _parse_call(self, metadata: str, body: str, tools) -> ToolCall | None:
        names = declared_tool_names(tools)
        if metadata:
            # With a declared tools list only its names count; without one (tools given inside the
            # messages) any metadata line followed by a JSON object is a call.
            if names and metadata not in names:
                return None
            call = parse_json_tool_call(metadata, body)
            return call if call is not None or metadata != PYTHON else python_call(body)
        # GLM-4's own server rule: first line a declared tool name, the rest a JSON object.
        first, sep, rest = body.strip().partition("\n")
        if sep and first.strip() in names and rest.lstrip().startswith("{"):
            return parse_json_tool_call(first.strip(), rest)
        return None

    def call_starts(self, tools) -> tuple[str, ...]:
        # The server rule above: an answer whose first line is a declared tool name may be a call.
        return tuple(f"{name}\n" for name in sorted(declared_tool_names(tools)))
