"""What the Responses API tests share: request bodies, the SSE event parser, and fixtures over the in-process tiny
server (server_api_support.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from server_api_support import WEATHER, fix_tool_calls, state_of

RESPONSES = "/v1/responses"
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": WEATHER["function"]["description"],
                "parameters": WEATHER["function"]["parameters"]}


def body(**overrides) -> dict:
    return {"model": "tiny", "input": "你好", "max_output_tokens": 4, "temperature": 0, **overrides}


@pytest.fixture
def prompts(app, monkeypatch):
    """The prompt ids of every request the engine receives, in order."""
    client, seen = state_of(app).client, []
    generate = client.generate

    def recording(prompt_ids, params, request_id=None):
        seen.append(list(prompt_ids))
        return generate(prompt_ids, params, request_id)

    monkeypatch.setattr(client, "generate", recording)
    return seen


@pytest.fixture
def to_the_limit(app, monkeypatch):
    """Greedy answers that run exactly to max_output_tokens: no chat stop tokens, no EOS."""
    state = state_of(app)
    monkeypatch.setattr(state.llm.chat_format, "stop_token_ids", [])
    sampling_params = state.client.chat.sampling_params
    monkeypatch.setattr(state.client.chat, "sampling_params",
                        lambda *a, **k: replace(sampling_params(*a, **k), ignore_eos=True))


@pytest.fixture
def length_is_stop(app, monkeypatch):
    """Answers that end at max_output_tokens report a natural stop (status "completed")."""
    client = state_of(app).client
    generate = client.generate

    async def stopping(prompt_ids, params, request_id=None):
        async for d in generate(prompt_ids, params, request_id):
            yield replace(d, finish_reason="stop") if d.finish_reason == "length" else d

    monkeypatch.setattr(client, "generate", stopping)


@pytest.fixture
def fixed_tool_call(app, monkeypatch, length_is_stop):
    """The tiny model never writes a readable call: parse() (given tools) returns a fixed one instead, and the
    output ends as if the call were complete (the random model may run a forced call's string to the limit)."""
    fix_tool_calls(app, monkeypatch)


@pytest.fixture
def sdk(client):
    """The openai SDK over the in-process app (TestClient is an httpx.Client)."""
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)


def create(client, **overrides) -> dict:
    r = client.post(RESPONSES, json=body(**overrides))
    assert r.status_code == 200, r.text
    return r.json()


def parse_events(text: str) -> list[dict]:
    """`event: T\\ndata: {...}\\n\\n` blocks -> the data objects; checks the framing and that T names the type."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        head, data = block.split("\n")
        assert head.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: "):])
        assert event["type"] == head[len("event: "):], block
        events.append(event)
    return events


def output_text(response: dict) -> str:
    return "".join(p["text"] for item in response["output"] if item["type"] == "message" for p in item["content"])
