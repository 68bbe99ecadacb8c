"""What the Anthropic Messages API tests share: request bodies, the SSE event parser, the SDK's own type check,
and fixtures over the in-process tiny server (server_api_support.py)."""

from __future__ import annotations

import json

import pytest

from glmkit.chat.tool_calls import ToolCall
from server_api_support import WEATHER, fix_tool_calls, state_of

MESSAGES, COUNT = "/v1/messages", "/v1/messages/count_tokens"
HEADERS = {"anthropic-version": "2023-06-01"}
WEATHER_TOOL = {"name": "get_weather", "description": WEATHER["function"]["description"],
                "input_schema": WEATHER["function"]["parameters"]}


def body(**overrides) -> dict:
    return {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "你好"}], **overrides}


def post(client, path=MESSAGES, headers=None, **kw):
    return client.post(path, json=body(**kw), headers={**HEADERS, **(headers or {})})


def parse_events(text: str) -> list[tuple[str, dict]]:
    """`event: X\\ndata: {...}\\n\\n` blocks -> [(X, data)]; checks the framing and that data.type == X."""
    assert text.endswith("\n\n"), text[-200:]
    out = []
    for block in text[:-2].split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        name, data = name_line[len("event: "):], json.loads(data_line[len("data: "):])
        assert data["type"] == name, block
        out.append((name, data))
    return out


def streamed_text(events) -> str:
    return "".join(d["delta"]["text"] for n, d in events
                   if n == "content_block_delta" and d["delta"]["type"] == "text_delta")


def check_sdk_types(message: dict | None = None, events=()) -> None:
    """The anthropic SDK's own models accept what we send."""
    types = pytest.importorskip("anthropic.types")
    from pydantic import TypeAdapter

    if message is not None:
        types.Message.model_validate(message)
    adapter = TypeAdapter(types.RawMessageStreamEvent)
    for name, data in events:
        if name not in ("ping", "error"):
            adapter.validate_python(data)


@pytest.fixture
def deterministic(app, monkeypatch):
    """Greedy decoding that runs to max_tokens (no chat stop tokens)."""
    monkeypatch.setattr(state_of(app).llm.chat_format, "stop_token_ids", [])
    return {"temperature": 0}


@pytest.fixture
def engine_calls(app, monkeypatch):
    """Records (prompt ids, sampling params) of every engine request."""
    client, seen = state_of(app).client, []
    original = client.generate

    def generate(prompt_ids, params, request_id=None):
        seen.append((list(prompt_ids), params))
        return original(prompt_ids, params, request_id)

    monkeypatch.setattr(client, "generate", generate)
    return seen


FIXED_CALL = ToolCall("get_weather", '{"city": "北京"}', "call_fixed")


@pytest.fixture
def fixed_tool_call(app, monkeypatch):
    """The tiny model never writes a parsable call: parse() (given tools) returns a fixed one."""
    fix_tool_calls(app, monkeypatch, FIXED_CALL)
