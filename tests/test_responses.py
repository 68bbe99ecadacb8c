"""OpenAI's Responses API (/v1/responses) on the in-process tiny model: the response object, input translation
(a Responses request must render exactly what the equivalent chat request renders), storage (previous_response_id,
GET / DELETE / input_items, bounds, truncation) and errors. Streams, golden transcripts, the openai SDK and the
fuzz: test_responses_stream.py.

The tiny model writes gibberish: the tests compare prompt ids, shapes and invariants, never content.
"""

from __future__ import annotations

import pytest

from responses_support import RESPONSES, WEATHER_TOOL, body, create, output_text
from responses_support import fixed_tool_call, length_is_stop, prompts, sdk, to_the_limit  # noqa: F401,F811 - fixtures
from server_api_support import CHAT, FIXED_CALL, LONG_TEXT, WEATHER, assert_openai_error, chat_body


# --- the response object ------------------------------------------------------------------------------------

def test_text_response_parses_as_the_sdk_response(client):
    from openai.types.responses import Response

    out = create(client, metadata={"k": "v"}, user="u1")
    parsed = Response.model_validate(out)
    assert out["id"].startswith("resp_") and out["object"] == "response" and out["model"] == "tiny"
    assert out["status"] in ("completed", "incomplete") and out["error"] is None
    [message] = out["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["annotations"] == []
    assert parsed.output_text == message["content"][0]["text"]
    assert out["metadata"] == {"k": "v"} and out["user"] == "u1" and out["store"] is True
    assert out["temperature"] == 0 and out["top_p"] == 1.0 and out["max_output_tokens"] == 4
    assert out["tools"] == [] and out["tool_choice"] == "auto" and out["parallel_tool_calls"] is True
    assert out["text"] == {"format": {"type": "text"}} and out["previous_response_id"] is None


def test_usage_and_incomplete_at_max_output_tokens(client, prompts, to_the_limit):
    out = create(client, max_output_tokens=5)
    assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][0]["status"] == "incomplete"
    usage = out["usage"]
    assert usage["input_tokens"] == len(prompts[-1]) and usage["output_tokens"] == 5
    assert usage["total_tokens"] == usage["input_tokens"] + 5
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert 0 <= usage["input_tokens_details"]["cached_tokens"] <= usage["input_tokens"]


def test_logprobs_on_request(client, to_the_limit):
    out = create(client, include=["message.output_text.logprobs"], top_logprobs=2)
    logprobs = out["output"][0]["content"][0]["logprobs"]
    assert len(logprobs) == 4 and all(len(lp["top_logprobs"]) == 2 for lp in logprobs)
    assert create(client)["output"][0]["content"][0]["logprobs"] == []


# --- input translation: the same prompt as the equivalent chat request ----------------------------------------

CHAT_TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                   "arguments": '{"city": "北京"}'}}
TRANSLATIONS = [
    ("string", {"input": "你好"}, {"messages": [{"role": "user", "content": "你好"}]}),
    ("instructions", {"input": "你好", "instructions": "简短回答"},
     {"messages": [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"}]}),
    ("roles-and-parts", {"input": [
        {"role": "developer", "content": "开发者"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "好的"}]},
        {"role": "user", "content": "再见"}]},
     {"messages": [{"role": "developer", "content": "开发者"}, {"role": "user", "content": "a\nb"},
                   {"role": "assistant", "content": "好的"}, {"role": "user", "content": "再见"}]}),
    ("tool-round-trip", {"tools": [WEATHER_TOOL], "input": [
        {"role": "user", "content": "北京天气？"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "北京"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "晴"}]},
     {"tools": [WEATHER], "messages": [
         {"role": "user", "content": "北京天气？"}, {"role": "assistant", "content": None,
                                                 "tool_calls": [CHAT_TOOL_CALL]},
         {"role": "tool", "tool_call_id": "call_1", "content": "晴"}]}),
    ("text-then-two-calls", {"tools": [WEATHER_TOOL], "input": [
        {"role": "user", "content": "两个城市"},
        {"role": "assistant", "content": "我查一下"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "北京"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "上海"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "晴"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "雨"}]}]},
     {"tools": [WEATHER], "messages": [
         {"role": "user", "content": "两个城市"},
         {"role": "assistant", "content": "我查一下", "tool_calls": [
             CHAT_TOOL_CALL, {**CHAT_TOOL_CALL, "id": "call_2",
                              "function": {"name": "get_weather", "arguments": '{"city": "上海"}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "晴"},
         {"role": "tool", "tool_call_id": "call_2", "content": "雨"}]}),
    ("tool-choice-none", {"tools": [WEATHER_TOOL], "tool_choice": "none"},
     {"tools": [WEATHER], "tool_choice": "none", "messages": [{"role": "user", "content": "你好"}]}),
]


@pytest.mark.parametrize("responses, chat", [c[1:] for c in TRANSLATIONS], ids=[c[0] for c in TRANSLATIONS])
def test_renders_the_same_prompt_as_chat(client, prompts, responses, chat):
    assert client.post(CHAT, json=chat_body(max_tokens=1, **chat)).status_code == 200
    r = client.post(RESPONSES, json=body(max_output_tokens=1, **responses))
    assert r.status_code == 200, r.text
    assert prompts[1] == prompts[0]


def test_named_tool_choice_forces_the_same_call_as_chat(client, prompts, fixed_tool_call):
    named = client.post(CHAT, json=chat_body(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}})).json()
    out = create(client, tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"})
    assert prompts[1] == prompts[0]
    assert out["status"] == "completed" and out["tool_choice"] == {"type": "function", "name": "get_weather"}
    [call] = out["output"]
    assert call == {"id": call["id"], "type": "function_call", "status": "completed",
                    "arguments": FIXED_CALL.arguments, "call_id": FIXED_CALL.id, "name": "get_weather"}
    assert call["id"].startswith("fc_")
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == call["arguments"]


# --- previous_response_id, store, GET / DELETE / input_items --------------------------------------------------

def test_previous_response_id_prepends_the_conversation_but_not_the_instructions(client, prompts):
    first = create(client, input="第一句", instructions="只用中文")
    second = create(client, input="第二句", previous_response_id=first["id"])
    assert second["previous_response_id"] == first["id"] and second["instructions"] is None
    messages = [{"role": "user", "content": "第一句"}, {"role": "assistant", "content": output_text(first)},
                {"role": "user", "content": "第二句"}]
    assert client.post(CHAT, json=chat_body(messages=messages, max_tokens=1)).status_code == 200
    assert prompts[1] == prompts[2]
    # a third turn sees the whole chain
    third = create(client, input="第三句", previous_response_id=second["id"], instructions="新的")
    messages = [{"role": "system", "content": "新的"}, *messages,
                {"role": "assistant", "content": output_text(second)}, {"role": "user", "content": "第三句"}]
    assert client.post(CHAT, json=chat_body(messages=messages, max_tokens=1)).status_code == 200
    assert prompts[3] == prompts[4] and third["status"] in ("completed", "incomplete")


def test_function_call_output_continues_a_stored_call(client, prompts, fixed_tool_call):
    first = create(client, input="北京天气？", tools=[WEATHER_TOOL], tool_choice="required")
    [call] = first["output"]
    create(client, previous_response_id=first["id"], tools=[WEATHER_TOOL],
           input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "晴，22 度"}])
    messages = [{"role": "user", "content": "北京天气？"},
                {"role": "assistant", "tool_calls": [{"id": call["call_id"], "type": "function", "function": {
                    "name": "get_weather", "arguments": call["arguments"]}}]},
                {"role": "tool", "tool_call_id": call["call_id"], "content": "晴，22 度"}]
    assert client.post(CHAT, json=chat_body(messages=messages, tools=[WEATHER], max_tokens=1)).status_code == 200
    assert prompts[1] == prompts[2]


def test_get_delete_and_input_items(client):
    out = create(client, input=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                {"role": "user", "content": "c"}])
    assert client.get(f"{RESPONSES}/{out['id']}").json() == out
    items = client.get(f"{RESPONSES}/{out['id']}/input_items").json()
    assert items["object"] == "list" and items["has_more"] is False
    assert [i["content"][0]["text"] for i in items["data"]] == ["c", "b", "a"]  # newest first by default
    assert all(i["id"].startswith("msg_") and i["type"] == "message" for i in items["data"])
    page = client.get(f"{RESPONSES}/{out['id']}/input_items", params={"order": "asc", "limit": 2}).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["a", "b"] and page["has_more"] is True
    rest = client.get(f"{RESPONSES}/{out['id']}/input_items",
                      params={"order": "asc", "after": page["last_id"]}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["c"]
    deleted = client.delete(f"{RESPONSES}/{out['id']}")
    assert deleted.status_code == 200 and deleted.json() == {"id": out["id"], "object": "response", "deleted": True}
    for r in (client.get(f"{RESPONSES}/{out['id']}"), client.delete(f"{RESPONSES}/{out['id']}"),
              client.get(f"{RESPONSES}/{out['id']}/input_items")):
        assert_openai_error(r, 404, param="response_id", code="response_not_found")


def test_store_false_is_not_kept(client):
    out = create(client, store=False)
    assert out["store"] is False
    assert_openai_error(client.get(f"{RESPONSES}/{out['id']}"), 404)
    r = client.post(RESPONSES, json=body(previous_response_id=out["id"]))
    assert_openai_error(r, 400, param="previous_response_id", code="previous_response_not_found")


def test_item_reference_resolves_a_stored_item(client, prompts):
    first = create(client, input="引用我")
    [item] = client.get(f"{RESPONSES}/{first['id']}/input_items").json()["data"]
    create(client, input=[{"type": "item_reference", "id": item["id"]}])
    assert prompts[1] == prompts[0]


def test_the_store_is_bounded(app, client):
    from glmkit.server.responses_routes import response_store

    store = response_store(app)
    capacity, store.capacity = store.capacity, 2
    try:
        ids = [create(client, max_output_tokens=1)["id"] for _ in range(3)]
        assert client.get(f"{RESPONSES}/{ids[0]}").status_code == 404
        assert all(client.get(f"{RESPONSES}/{i}").status_code == 200 for i in ids[1:])
    finally:
        store.capacity = capacity


def test_truncation_auto_drops_the_oldest_turns(client, prompts):
    turn = "今天天气怎么样？北京晴，气温 22 度。" * 12
    pair = ({"role": "user", "content": turn}, {"role": "assistant", "content": "好"})
    history = [m for _ in range(4) for m in pair]
    r = client.post(RESPONSES, json=body(input=[*history, {"role": "user", "content": "最后"}]))
    assert_openai_error(r, 400, param="input", code="context_length_exceeded")
    out = create(client, input=[*history, {"role": "user", "content": "最后"}], truncation="auto")
    assert out["truncation"] == "auto" and len(prompts[-1]) < 512


# --- errors ----------------------------------------------------------------------------------------------------

ERRORS = [
    ("unknown-previous", body(previous_response_id="resp_nope"), 400, "previous_response_id",
     "previous_response_not_found"),
    ("web-search-tool", body(tools=[WEATHER_TOOL, {"type": "web_search"}]), 400, "tools[1].type", "invalid_value"),
    ("tool-name", body(tools=[{**WEATHER_TOOL, "name": "a b"}]), 400, "tools[0].name", "invalid_value"),
    ("tool-choice-unknown", body(tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "nope"}), 400,
     "tool_choice", "invalid_value"),
    ("tool-choice-type", body(tools=[WEATHER_TOOL], tool_choice={"type": "file_search"}), 400, "tool_choice",
     "invalid_value"),
    ("required-without-tools", body(tool_choice="required"), 400, "tool_choice", "invalid_value"),
    ("image-part", body(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), 400,
     "input[0].content[0].type", "invalid_value"),
    ("role", body(input=[{"role": "tool", "content": "x"}]), 400, "input[0].role", "invalid_value"),
    ("item-type", body(input=[{"type": "computer_call_output"}]), 400, "input[0].type", "invalid_value"),
    ("call-without-call_id", body(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), 400,
     "input[0].call_id", "invalid_value"),
    ("call-arguments", body(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]),
     400, "input[0].arguments", "invalid_value"),
    ("unknown-reference", body(input=[{"type": "item_reference", "id": "msg_nope"}]), 400, "input[0].id",
     "invalid_value"),
    ("no-input", {"model": "tiny"}, 400, "input", "invalid_value"),
    ("reasoning", body(reasoning={"effort": "high"}), 400, "reasoning.effort", "invalid_value"),
    ("background", body(background=True), 400, "background", "invalid_value"),
    ("include", body(include=["nonsense"]), 400, "include[0]", "invalid_value"),
    ("schema-without-name", body(text={"format": {"type": "json_schema", "schema": {"type": "object"}}}), 400,
     "text.format.name", "invalid_value"),
    ("temperature", body(temperature=5), 400, "temperature", "invalid_value"),
    ("max_output_tokens", body(max_output_tokens=0), 400, "max_output_tokens", "invalid_value"),
    ("metadata", body(metadata={str(i): "v" for i in range(17)}), 400, "metadata", "invalid_value"),
    ("unknown-model", body(model="gpt-4o"), 404, "model", "model_not_found"),
    ("context-length", body(input=LONG_TEXT), 400, "input", "context_length_exceeded"),
]


@pytest.mark.parametrize("request_body, status, param, code", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_errors_have_openai_shape(client, request_body, status, param, code, stream):
    r = client.post(RESPONSES, json={**request_body, "stream": stream})
    assert_openai_error(r, status, param=param, code=code)


def test_harmless_fields_are_accepted(client):
    out = create(client, reasoning={"effort": None}, include=["reasoning.encrypted_content"], service_tier="auto",
                 prompt_cache_key="k", safety_identifier="s", text={"format": {"type": "text"}, "verbosity": "low"},
                 stream_options={"include_obfuscation": False}, truncation="disabled")
    assert out["text"] == {"format": {"type": "text"}, "verbosity": "low"} and out["prompt_cache_key"] == "k"
