"""ChatGLM3-6B: token-level prompt `[gMASK] sop` then per message `<|role|>` + encode(metadata + "\\n") +
encode(content), then `<|assistant|>` (spec 2.3).

Role tokens are placed as ids; message text goes through `encode`, which never yields special ids, so a user
writing "<|user|>" cannot forge a turn. Tools become the official leading system message; assistant tool
calls in the history are written back as the fenced `tool_call(...)` the model emits. Output parsing reads
those fences with `ast` only (tool_calls.py). Knows nothing of the engine.
"""

from __future__ import annotations

import json

from .base import CHATGLM_REPLACEMENTS, SegmentedFormat
from .grammars import chatglm3_calls
from .tool_calls import ToolCall, dump_arguments, fenced_body, format_python_tool_call, parse_python_tool_call

TOOLS_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
INTERPRETER = "interpreter"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
               "observation": "<|observation|>", "tool": "<|observation|>", "function": "<|observation|>"}


def tools_json(tools) -> str:
    return json.dumps(tools, indent=4, ensure_ascii=False)


def call_turns(message: dict, format_call) -> list[tuple[str, str, str]]:
    """An assistant message -> (role, metadata, content) turns: its text (if any), then one turn per call."""
    turns = []
    if message["content"] or not message.get("tool_calls"):
        turns.append(("assistant", message["metadata"], message["content"]))
    for call in message.get("tool_calls", []):
        function = call["function"]
        turns.append(("assistant", function["name"], format_call(function["name"], function["arguments"])))
    return turns


def python_call_text(name: str, arguments: str) -> str:
    args = json.loads(arguments)
    if name == INTERPRETER and set(args) == {"code"} and isinstance(args["code"], str):
        return "```python\n" + args["code"] + "\n```"  # the interpreter turn is the code itself
    return format_python_tool_call(args)


class ChatGLM3Format(SegmentedFormat):
    name = "chatglm3"
    required_special_tokens = ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
    replacements = CHATGLM_REPLACEMENTS

    def _format_stop_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id, self.special("<|user|>"), self.special("<|observation|>")]

    def turns(self, messages: list[dict], tools: list[dict] | None) -> list[tuple[str, str, str]]:
        """Messages -> (role, metadata, content) turns in ChatGLM3's own history shape."""
        turns = []
        if tools:
            turns.append(("system", "", TOOLS_SYSTEM_PROMPT + "\n" + tools_json(tools)))
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system" and "tools" in message:
                content = content + "\n" + tools_json(message["tools"])
            if role == "assistant":
                turns.extend(call_turns(message, python_call_text))
            else:
                turns.append((role, message["metadata"], content))
        return turns

    def _render(self, messages, tools, character, add_generation_prompt):
        ids = [self.special("[gMASK]"), self.special("sop")]
        for role, metadata, content in self.turns(messages, tools):
            ids.append(self.special(ROLE_TOKENS[role]))
            ids += self.tokenizer.encode(metadata + "\n")
            ids += self.tokenizer.encode(content)
        if add_generation_prompt:
            ids.append(self.special("<|assistant|>"))
        return ids

    def call_grammar(self, tools: list[dict], parallel: bool) -> str:
        return chatglm3_calls(tools, parallel, self.special(self.segment_token), INTERPRETER)

    def _parse_call(self, metadata: str, body: str, tools) -> ToolCall | None:
        if not metadata:
            return None
        if metadata == INTERPRETER:
            code = fenced_body(body)
            code = (body if code is None else code).strip()
            arguments = dump_arguments({"code": code})
            return ToolCall(name=INTERPRETER, arguments=arguments) if code and arguments else None
        return parse_python_tool_call(metadata, body)
