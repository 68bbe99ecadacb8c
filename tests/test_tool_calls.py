"""Tool-call parsing for the three output styles (ChatGLM3 python fence, GLM-4 JSON, Qwen/Hermes tags), the
"never eval" guarantee, and streaming display text."""

from __future__ import annotations

import builtins
import json
import os
import re

import pytest

from glmkit.chat import get_chat_format
from glmkit.chat.serving import display_text
from glmkit.chat.tool_calls import (ToolCall, format_python_tool_call, parse_hermes_tool_calls,
                                    parse_python_tool_call)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


def fmt(name, tokenizer):
    return get_chat_format(name, tokenizer=tokenizer, model_type="test")


def glm3_output(sp, *segments: tuple[str, str]) -> list[int]:
    """Generated ids as ChatGLM3 emits them: segments `metadata\\n` + content joined by <|assistant|>."""
    ids: list[int] = []
    for n, (metadata, content) in enumerate(segments):
        if n:
            ids.append(sp.special_id("<|assistant|>"))
        ids += sp.encode(metadata + "\n") + sp.encode(content)
    return ids


def args(call: ToolCall) -> dict:
    return json.loads(call.arguments)


# --- ChatGLM3 -----------------------------------------------------------------------------------------

def test_chatglm3_tool_call(sp):
    out = fmt("chatglm3", sp).parse(glm3_output(
        sp, ("get_weather", '```python\ntool_call(location="北京", unit="celsius")\n```')), TOOLS)
    assert out.content == ""
    [call] = out.tool_calls
    assert call.name == "get_weather"
    assert call.arguments == '{"location": "北京", "unit": "celsius"}'  # ensure_ascii=False
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)


def test_chatglm3_thought_then_call(sp):
    ids = glm3_output(sp, ("", "我需要先查询天气。"), ("get_weather", "```python\ntool_call(location='上海')\n```"))
    out = fmt("chatglm3", sp).parse(ids, TOOLS)
    assert out.content == "我需要先查询天气。"
    assert [(c.name, args(c)) for c in out.tool_calls] == [("get_weather", {"location": "上海"})]


def test_chatglm3_nested_values(sp):
    body = ("```python\ntool_call(filters={'city': ['北京', '上海'], 'days': 3}, exact=True, page=None, "
            "ratio=-0.5, pair=(1, 2))\n```")
    [call] = fmt("chatglm3", sp).parse(glm3_output(sp, ("search", body))).tool_calls
    assert args(call) == {"filters": {"city": ["北京", "上海"], "days": 3}, "exact": True, "page": None,
                          "ratio": -0.5, "pair": [1, 2]}


def test_chatglm3_interpreter(sp):
    [call] = fmt("chatglm3", sp).parse(glm3_output(
        sp, ("interpreter", "```python\nimport math\nprint(math.pi)\n```"))).tool_calls
    assert call.name == "interpreter" and args(call) == {"code": "import math\nprint(math.pi)"}


@pytest.mark.parametrize("body", [
    "```python\ntool_call(location=\n```",              # syntax error
    "```python\ntool_call('北京')\n```",                # positional argument
    "```python\nget_weather(location='北京')\n```",     # not tool_call
    "```python\ntool_call(x=[i for i in range(3)])\n```",  # not a literal
    "```python\ntool_call(x={1, 2})\n```",              # no JSON form
    "```python\ntool_call(a=1); tool_call(b=2)\n```",   # two statements
    "I cannot call a tool right now.",
])
def test_chatglm3_unparsable_call_is_text(sp, body):
    out = fmt("chatglm3", sp).parse(glm3_output(sp, ("get_weather", body)), TOOLS)
    assert out.tool_calls == []
    assert out.content == body.strip()


def test_chatglm3_never_evals(sp, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    calls = []
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: calls.append(("eval", a)))
    monkeypatch.setattr(builtins, "exec", lambda *a, **k: calls.append(("exec", a)))
    monkeypatch.setattr(os, "system", lambda *a, **k: calls.append(("system", a)))
    payloads = [f"tool_call(x=__import__('os').system('echo hi > {marker}'))",
                "tool_call(x=().__class__.__base__.__subclasses__())",
                f"tool_call(**__import__('os').system('touch {marker}'))"]
    for payload in payloads:
        body = "```python\n" + payload + "\n```"
        out = fmt("chatglm3", sp).parse(glm3_output(sp, ("get_weather", body)), TOOLS)
        assert out.tool_calls == [] and payload in out.content
    assert calls == [] and not marker.exists()


def test_python_call_round_trip():
    original = {"city": "北京", "class": "first", "my-key": [1, {"a": None}], "ok": False}
    text = format_python_tool_call(original)
    assert text.startswith("```python\ntool_call(") and text.endswith(")\n```")
    assert json.loads(parse_python_tool_call("f", text).arguments) == original


def test_chatglm3_plain_answer_postprocessing(sp):
    out = fmt("chatglm3", sp).parse(glm3_output(sp, ("", "  我的知识截止到[[训练时间]]。  ")))
    assert out.content == "我的知识截止到2023年。" and out.tool_calls == []


# --- GLM-4 --------------------------------------------------------------------------------------------

def glm4_output(g4, *segments: tuple[str, str]) -> list[int]:
    ids: list[int] = []
    for n, (metadata, content) in enumerate(segments):
        if n:
            ids.append(g4.special_id("<|assistant|>"))
        ids += g4.encode(metadata + "\n" + content)
    return ids


def test_glm4_tool_call(g4):
    out = fmt("glm4", g4).parse(glm4_output(g4, ("get_weather", '{"location": "北京", "days": [1, 2], '
                                                                '"opts": {"unit": "摄氏"}}')), TOOLS)
    [call] = out.tool_calls
    assert call.name == "get_weather" and out.content == ""
    assert args(call) == {"location": "北京", "days": [1, 2], "opts": {"unit": "摄氏"}}
    assert "北京" in call.arguments


def test_glm4_rules(g4):
    f = fmt("glm4", g4)
    # undeclared tool name, or a body that is not a JSON object: text
    out = f.parse(glm4_output(g4, ("delete_all", '{"x": 1}')), TOOLS)
    assert out.tool_calls == [] and out.content == '{"x": 1}'
    out = f.parse(glm4_output(g4, ("get_weather", "北京今天晴")), TOOLS)
    assert out.tool_calls == [] and out.content == "北京今天晴"
    out = f.parse(glm4_output(g4, ("get_weather", "[1, 2]")), TOOLS)
    assert out.tool_calls == []
    # the server's own rule: no metadata, but the first line is a declared tool and the rest JSON
    out = f.parse(glm4_output(g4, ("", 'search\n{"query": "GLM-4"}')), TOOLS)
    assert [(c.name, args(c)) for c in out.tool_calls] == [("search", {"query": "GLM-4"})]
    # thought then call, and a plain answer
    out = f.parse(glm4_output(g4, ("", "让我查一下。"), ("search", '{"query": "天气"}')), TOOLS)
    assert out.content == "让我查一下。" and out.tool_calls[0].name == "search"
    assert f.parse(glm4_output(g4, ("", "你好！"))).content == "你好！"


# --- Qwen / Hermes ------------------------------------------------------------------------------------

def test_hermes_blocks():
    text = ('好的。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": [\\"a\\", {\\"b\\": 1}]}"}\n</tool_call>')
    content, calls = parse_hermes_tool_calls(text)
    assert content.strip() == "好的。"
    assert [(c.name, args(c)) for c in calls] == [("get_weather", {"city": "北京"}),
                                                  ("search", {"query": ["a", {"b": 1}]})]


def test_hermes_malformed_stays_text_and_unclosed_counts():
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    content, calls = parse_hermes_tool_calls(bad)
    assert calls == [] and content == bad
    content, calls = parse_hermes_tool_calls('<tool_call>\n{"name": "search", "arguments": {"q": "x"}}')
    assert content == "" and calls[0].name == "search"
    assert parse_hermes_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name


def test_jinja_parse(hf):
    ids = hf.encode('先查一下。<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call>')
    out = fmt("jinja", hf).parse(ids, TOOLS)
    assert out.content == "先查一下。" and args(out.tool_calls[0]) == {"city": "上海"}


# --- streaming display ---------------------------------------------------------------------------------

def stream(f, ids: list[int]) -> tuple[str, list[str]]:
    """Feed ids one at a time as LLM.stream_chat does; return the concatenated deltas and every display."""
    shown, displays = "", []
    for k in range(1, len(ids) + 1):
        display = display_text(f, ids[:k])
        displays.append(display)
        assert display.startswith(shown), (shown, display)  # prefix-stable
        shown = display
    return shown, displays


@pytest.mark.parametrize("name", ["chatglm2", "chatglm3", "glm4", "jinja"])
def test_display_text_is_prefix_stable_for_plain_answers(name, sp, g4, hf):
    # Rare characters fall back to bytes in the tiny tokenizers, so partial UTF-8 appears mid-stream.
    answer = "  你好！我的知识截止到[[训练时间]]。龘靐齉 < [ ok\n\n第二段 end  "
    tokenizer = {"chatglm2": sp, "chatglm3": sp, "glm4": g4, "jinja": hf}[name]
    f = fmt(name, tokenizer)
    if name == "chatglm3":
        ids = glm3_output(sp, ("", answer))
    elif name == "glm4":
        ids = glm4_output(g4, ("", answer))
    else:
        ids = tokenizer.encode(answer)
    shown, displays = stream(f, ids)
    final = f.parse(ids).content
    assert display_text(f, ids, final=True) == final
    assert final.startswith(shown) and final.endswith("end")
    assert not any("\ufffd" in d for d in displays)
    if name in ("chatglm2", "chatglm3"):  # their post-processing rewrites the marker: never show half of it
        assert "2023年" in final and not any("[[训练" in d for d in displays)


def test_display_text_hides_tool_calls(sp, hf):
    f = fmt("chatglm3", sp)
    ids = glm3_output(sp, ("", "我来查一下。"), ("get_weather", "```python\ntool_call(location='北京')\n```"))
    shown, displays = stream(f, ids)
    assert shown == "我来查一下。" and not any("tool_call" in d or "get_weather" in d for d in displays)

    f = fmt("jinja", hf)
    ids = hf.encode('先查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call>')
    shown, displays = stream(f, ids)
    assert shown == "先查一下。" and not any("<tool" in d or "get_weather" in d for d in displays)


def test_jinja_bare_json_call_only_for_declared_tools(hf):
    f = fmt("jinja", hf)
    fenced = '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "北京"\n  }\n}\n```'
    out = f.parse(hf.encode(fenced), TOOLS)
    assert out.content == "" and [(c.name, args(c)) for c in out.tool_calls] == [("get_weather", {"city": "北京"})]
    bare = '[{"name": "get_weather", "arguments": {"city": "a"}}, {"name": "search", "arguments": {"q": "b"}}]'
    assert [c.name for c in f.parse(hf.encode(bare), TOOLS).tool_calls] == ["get_weather", "search"]
    column = '{"name": "get_weather", "arguments": {"city": "a"}}\n{"name": "search", "arguments": {"q": "b"}}\n'
    assert [c.name for c in f.parse(hf.encode(column), TOOLS).tool_calls] == ["get_weather", "search"]
    # without tools, with an undeclared name, with other text around it, or one object cut short: an answer
    for text, tools in ((fenced, None), ('{"name": "rm", "arguments": {}}', TOOLS),
                        ('Here: {"name": "search", "arguments": {}}', TOOLS),
                        ('{"name": "search", "arguments": {}} done', TOOLS), (column + '{"name": "sea', TOOLS)):
        out = f.parse(hf.encode(text), tools)
        assert out.tool_calls == [] and out.content == text.strip()
