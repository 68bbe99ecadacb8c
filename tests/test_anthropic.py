"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens).

Fast tests run the in-process tiny random ChatGLM3 server (server_api_support.py): request translation (the
prompt and sampling parameters equal those of the equivalent OpenAI request), response and stream shapes
(checked against the anthropic SDK's own types), stop sequences, tool use, and a golden SSE transcript (tests/golden/sse/anthropic_*.jsonl; rewrite with GLMKIT_UPDATE_GOLDEN=1).
Errors, auth and the SDK: test_anthropic_errors.py.
"""

from __future__ import annotations

import asyncio
import copy
import json

import pytest

from anthropic_support import (COUNT, HEADERS, MESSAGES, WEATHER_TOOL, body, check_sdk_types, parse_events, post,
                               streamed_text)
from anthropic_support import deterministic, engine_calls, fixed_tool_call  # noqa: F401,F811 - fixtures
from glmkit.chat.tool_calls import ParsedOutput, ToolCall
from glmkit.engine.outputs import Delta
from server_api_support import CHAT, GOLDEN_DIR, UPDATE_GOLDEN, state_of


# --- request translation -----------------------------------------------------------------------------------

# Short: the tiny model's context is 512 tokens and its tokenizer spends many on English and JSON.
SMALL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
HISTORY_ANTHROPIC = dict(
    system=[{"type": "text", "text": "简短"}, {"type": "text", "text": "回答"}],
    messages=[
        {"role": "user", "content": [{"type": "text", "text": "北京", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "好"},
            {"type": "tool_use", "id": "toolu_01", "name": "w", "input": {"city": "北京"}},
            {"type": "tool_use", "id": "toolu_02", "name": "w", "input": {"city": "上海"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "晴"},
            {"type": "tool_result", "tool_use_id": "toolu_02", "content": [{"type": "text", "text": "雨"}]},
            {"type": "text", "text": "明天"}]}],
    tools=[{"name": "w", "description": "天气", "input_schema": SMALL_SCHEMA}])
HISTORY_OPENAI = dict(
    messages=[
        {"role": "system", "content": "简短\n回答"},
        {"role": "user", "content": "北京"},
        {"role": "assistant", "content": "好", "tool_calls": [
            {"id": "toolu_01", "type": "function", "function": {"name": "w", "arguments": '{"city": "北京"}'}},
            {"id": "toolu_02", "type": "function", "function": {"name": "w", "arguments": '{"city": "上海"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "晴"},
        {"role": "tool", "tool_call_id": "toolu_02", "content": "雨"},
        {"role": "user", "content": "明天"}],
    tools=[{"type": "function", "function": {"name": "w", "description": "天气", "parameters": SMALL_SCHEMA}}])
TOOL_CHOICES = [  # Anthropic tool_choice -> OpenAI tool_choice
    (None, None), ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "w"}, {"type": "function", "function": {"name": "w"}})]


@pytest.mark.parametrize("anthropic_choice, openai_choice", TOOL_CHOICES,
                         ids=["unset", "auto", "any", "none", "tool"])
def test_prompt_and_params_equal_the_openai_equivalent(client, engine_calls, anthropic_choice, openai_choice):
    sampling = dict(temperature=0.5, top_p=0.9, top_k=5, max_tokens=3)
    a = body(**HISTORY_ANTHROPIC, **sampling, stop_sequences=["xyz"], metadata={"user_id": "u1"})
    o = {"model": "tiny", **HISTORY_OPENAI, **sampling, "stop": ["xyz"]}
    if anthropic_choice is not None:
        a["tool_choice"], o["tool_choice"] = anthropic_choice, openai_choice
    assert client.post(MESSAGES, json=a, headers=HEADERS).status_code == 200
    assert client.post(CHAT, json=o).status_code == 200
    (a_ids, a_params), (o_ids, o_params) = engine_calls
    assert a_ids == o_ids
    assert a_params == o_params
    assert client.post(COUNT, json={k: v for k, v in a.items() if k != "max_tokens"}).json() == {
        "input_tokens": len(a_ids)}


def test_string_content_and_system_string(client, engine_calls):
    client.post(MESSAGES, json=body(system="Be brief.", messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}]))
    client.post(CHAT, json={"model": "tiny", "max_tokens": 4, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]})
    assert engine_calls[0][0] == engine_calls[1][0]


def test_tool_result_error_is_marked(client, engine_calls):
    def ask(is_error):
        messages = copy.deepcopy(HISTORY_ANTHROPIC["messages"])
        messages[2]["content"][0]["is_error"] = is_error
        assert client.post(MESSAGES, json=body(messages=messages)).status_code == 200
    ask(False)
    ask(True)
    tok = state_of(client.app).llm.tokenizer
    assert "Error: 晴" not in tok.decode(engine_calls[0][0])
    assert "Error: 晴" in tok.decode(engine_calls[1][0])


# --- responses and streams ---------------------------------------------------------------------------------

def test_message_shape_and_stream_agree(client, deterministic):
    r = post(client, max_tokens=6, **deterministic)
    assert r.status_code == 200, r.text
    msg = r.json()
    check_sdk_types(msg)
    assert set(msg) == {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
    assert msg["id"].startswith("msg_") and msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["model"] == "tiny" and msg["stop_reason"] == "max_tokens" and msg["stop_sequence"] is None
    [block] = msg["content"]
    assert block["type"] == "text" and block["text"]
    usage = msg["usage"]
    assert usage["output_tokens"] == 6
    counted = client.post(COUNT, json={"model": "tiny", "messages": body()["messages"]}).json()["input_tokens"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == counted > 0

    r = post(client, max_tokens=6, stream=True, **deterministic)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_events(r.text)
    check_sdk_types(events=events)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] + start["usage"]["cache_read_input_tokens"] == counted
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(d["index"] == 0 for n, d in events if n.startswith("content_block"))
    assert streamed_text(events) == block["text"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6


def test_count_tokens_ignores_generation_fields(client):
    r = client.post(COUNT, json=body(system="Be brief.", stream=True, temperature=0.3), headers=HEADERS)
    assert r.status_code == 200 and set(r.json()) == {"input_tokens"} and r.json()["input_tokens"] > 0
    check_sdk_types()
    from anthropic.types import MessageTokensCount

    MessageTokensCount.model_validate(r.json())


def test_stop_sequence_is_cut_and_reported(client, deterministic):
    full = post(client, max_tokens=12, **deterministic).json()["content"][0]["text"]
    candidates = [full[k:k + 2] for k in range(2, len(full) - 3) if full[k:k + 2].isalnum()] or [full[3:5]]
    stop = candidates[0]
    expected = full[:full.find(stop)]
    msg = post(client, max_tokens=12, stop_sequences=[stop], **deterministic).json()
    assert msg["stop_reason"] == "stop_sequence" and msg["stop_sequence"] == stop
    assert msg["content"][0]["text"] == expected
    events = parse_events(post(client, max_tokens=12, stop_sequences=[stop], stream=True, **deterministic).text)
    assert streamed_text(events) == expected
    assert all(stop not in d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}


def test_end_turn_when_the_model_stops(client, app, monkeypatch):
    tok = state_of(app).llm.tokenizer
    monkeypatch.setattr(state_of(app).client, "generate", fake_generate(tok.encode("Hi there"), final="stop"))
    msg = post(client).json()
    assert msg["stop_reason"] == "end_turn" and msg["content"] == [{"type": "text", "text": "Hi there"}]


# --- tool use ----------------------------------------------------------------------------------------------

def test_tool_use_block(client, fixed_tool_call):
    msg = post(client, tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"}).json()
    check_sdk_types(msg)
    assert msg["stop_reason"] == "tool_use"
    [block] = msg["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_") and len(block["id"]) > 10
    assert block["name"] == "get_weather" and block["input"] == {"city": "北京"}


def normalize_events(events, output_tokens: bool = True) -> list[dict]:
    """Volatile values -> placeholders (ids, the random model's text, prompt and cache sizes, and without
    `output_tokens` the output's); consecutive text deltas (how the gibberish splits) collapse into one."""
    out = []
    for name, data in events:
        d = copy.deepcopy(data)
        if name == "message_start":
            d["message"]["id"] = "<msg_id>"
        usage = d.get("usage") or (d.get("message") or {}).get("usage")
        if usage:
            usage["input_tokens"] = usage["cache_read_input_tokens"] = "<n>"
            if not output_tokens and usage["output_tokens"]:
                usage["output_tokens"] = "<n>"
        block = d.get("content_block") or {}
        if block.get("type") == "tool_use":
            block["id"] = "<toolu_id>"
        if d.get("delta", {}).get("type") == "text_delta":
            d["delta"]["text"] = "<text>"
            if out and out[-1]["data"] == d:
                continue
        out.append({"event": name, "data": d})
    return out


def check_golden(name: str, events, output_tokens: bool = True) -> None:
    path = GOLDEN_DIR / f"{name}.jsonl"
    lines = [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in normalize_events(events, output_tokens)]
    if UPDATE_GOLDEN:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert path.exists(), f"{path} is missing; run with GLMKIT_UPDATE_GOLDEN=1 to write it"
    expected = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [json.loads(x) for x in expected], "\n".join(lines)


def test_golden_stream(client, deterministic):
    events = parse_events(post(client, max_tokens=6, stream=True, system="Be brief.", **deterministic).text)
    check_golden("anthropic_stream", events)


def test_golden_streamed_tool_use(client, fixed_tool_call):
    r = post(client, stream=True, temperature=0, tools=[WEATHER_TOOL],
             tool_choice={"type": "tool", "name": "get_weather"})
    events = parse_events(r.text)
    check_sdk_types(events=events)
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["tool_use"] and starts[0]["index"] == 0
    assert starts[0]["content_block"]["input"] == {}
    parts = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert json.loads("".join(parts)) == {"city": "北京"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    check_golden("anthropic_stream_tool_use", events, output_tokens=False)  # how long the forced call ran


def fake_generate(token_ids: list[int], final: str = "stop"):
    async def generate(prompt_ids, params, request_id=None):
        for i, token in enumerate(token_ids):
            await asyncio.sleep(0)
            last = i == len(token_ids) - 1
            yield Delta(request_id or "fake", 0, "", [token], finish_reason=final if last else None,
                        num_prompt_tokens=len(prompt_ids), num_output_tokens=i + 1)
    return generate


def test_real_parser_text_then_tool_use(client, app, monkeypatch):
    """ChatGLM3 writes a call as a metadata line + python fence; after some text that is two blocks."""
    tok = state_of(app).llm.tokenizer
    fmt = state_of(app).llm.chat_format
    ids = (tok.encode("Let me look.") + [fmt.special("<|assistant|>")]
           + tok.encode('get_weather\n```python\ntool_call(city="Beijing")\n```'))
    monkeypatch.setattr(state_of(app).client, "generate", fake_generate(ids))
    msg = post(client, tools=[WEATHER_TOOL]).json()
    check_sdk_types(msg)
    assert msg["stop_reason"] == "tool_use"
    assert [b["type"] for b in msg["content"]] == ["text", "tool_use"]
    assert msg["content"][0]["text"] == "Let me look."
    assert msg["content"][1]["input"] == {"city": "Beijing"}

    events = parse_events(post(client, tools=[WEATHER_TOOL], stream=True).text)
    check_sdk_types(events=events)
    assert streamed_text(events) == "Let me look."
    starts = [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"]
    assert starts == [(0, "text"), (1, "tool_use")]
    assert [d["index"] for n, d in events if n == "content_block_stop"] == [0, 1]


def test_disable_parallel_tool_use_keeps_one_call(client, app, monkeypatch):
    fmt = state_of(app).llm.chat_format
    two = ParsedOutput("", [ToolCall("get_weather", '{"city": "A"}'), ToolCall("get_weather", '{"city": "B"}')])
    monkeypatch.setattr(fmt, "parse", lambda ids, tools=None: two if tools else ParsedOutput("x"))
    both = post(client, tools=[WEATHER_TOOL]).json()["content"]
    assert [b["input"]["city"] for b in both] == ["A", "B"]
    one = post(client, tools=[WEATHER_TOOL], tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b["input"]["city"] for b in one.json()["content"]] == ["A"]
