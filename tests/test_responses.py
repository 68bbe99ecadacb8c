"""OpenAI's Responses API (/v1/responses): the in-process tiny model for shapes, translation, storage, errors and
the SSE event stream (with a golden transcript); the real default model (slow) for the openai SDK's
`responses.create`, `responses.stream`, a function-tool round trip and `responses.parse`.

The tiny model writes gibberish: the fast tests compare prompt ids (a Responses request must render exactly
what the equivalent chat request renders), shapes and invariants, never content.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

from glmkit.chat.tool_calls import ParsedOutput, ToolCall
from server_api_support import (
    CHAT, FIXED_CALL, GOLDEN_DIR, LONG_TEXT, UPDATE_GOLDEN, WEATHER, assert_openai_error, chat_body, state_of,
)

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
    fmt = state_of(app).llm.chat_format
    parse = fmt.parse

    def fixed(output_ids, tools=None):
        if tools:
            return ParsedOutput(content="", tool_calls=[ToolCall(FIXED_CALL.name, FIXED_CALL.arguments,
                                                                  FIXED_CALL.id)])
        return parse(output_ids, tools)

    monkeypatch.setattr(fmt, "parse", fixed)


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


# --- streaming -----------------------------------------------------------------------------------------------

TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.output_item.added", "response.function_call_arguments.delta",
               "response.function_call_arguments.done", "response.output_item.done"]


def event_types(events: list[dict]) -> list[str]:
    """Types, with a run of text deltas collapsed into one."""
    out = []
    for e in events:
        if not (e["type"] == "response.output_text.delta" and out and out[-1] == e["type"]):
            out.append(e["type"])
    return out


def stream_events(client, **overrides) -> list[dict]:
    r = client.post(RESPONSES, json=body(stream=True, **overrides))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = parse_events(r.text)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(ids) == 1
    return events


def test_stream_event_order_matches_the_plain_response(client, to_the_limit):
    events = stream_events(client, max_output_tokens=6)
    assert event_types(events) == TEXT_EVENTS + ["response.incomplete"]
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["usage"]["output_tokens"] == 6
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == deltas == output_text(final) != ""
    message = final["output"][0]
    assert {e.get("item_id", e.get("item", {}).get("id")) for e in events[2:-1]} == {message["id"]}
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    plain = create(client, max_output_tokens=6)
    assert output_text(plain) == deltas and plain["usage"] == final["usage"]
    assert client.get(f"{RESPONSES}/{final['id']}").json() == final


def test_stream_of_a_tool_call(client, fixed_tool_call):
    events = stream_events(client, tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"})
    assert event_types(events) == ["response.created", "response.in_progress", *CALL_EVENTS, "response.completed"]
    added, delta, done, item_done = events[2:6]
    assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
    assert delta["delta"] == done["arguments"] == FIXED_CALL.arguments
    assert item_done["item"] == events[-1]["response"]["output"][0]
    assert item_done["item"]["call_id"] == FIXED_CALL.id


def test_streamed_logprobs(client, to_the_limit):
    events = stream_events(client, include=["message.output_text.logprobs"], top_logprobs=1)
    done = next(e for e in events if e["type"] == "response.output_text.done")
    streamed = [lp for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    assert len(done["logprobs"]) == 4 and streamed == done["logprobs"][:len(streamed)]


def test_a_failure_mid_stream_is_reported_in_band(app, client, monkeypatch):
    async def broken(prompt_ids, params, request_id=None):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    monkeypatch.setattr(state_of(app).client, "generate", broken)
    events = stream_events(client)
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    assert "boom" in events[2]["message"] and events[3]["response"]["status"] == "failed"
    assert events[3]["response"]["error"]["code"] == "server_error"
    assert client.get(f"{RESPONSES}/{events[0]['response']['id']}").status_code == 404
    assert state_of(app).in_flight == 0


# --- golden SSE transcripts ----------------------------------------------------------------------------------

VOLATILE = {"id", "item_id", "call_id", "created_at", "completed_at"}


def normalize(events: list[dict], counts: tuple[str, ...]) -> list[dict]:
    """Ids, timestamps, the random model's text and the token `counts` (the prompt size, how much of it was
    cached) -> placeholders; a run of text deltas -> one (sequence numbers are checked by stream_events, then
    dropped: the run's length is the model's business)."""
    def scrub(value, key=None):
        if isinstance(value, dict):
            return {k: scrub(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if key in VOLATILE and value is not None:
            return f"<{key}>"
        if key in ("text", "delta") and isinstance(value, str) and value and not value.startswith("{"):
            return "<text>"
        if key in counts:
            return "<n>"
        return value

    out = []
    for event in events:
        e = scrub(copy.deepcopy(event))
        e.pop("sequence_number")
        if out and e["type"] == "response.output_text.delta" and out[-1] == e:
            continue
        out.append(e)
    return out


def check_golden(name: str, events: list[dict], counts=("input_tokens", "total_tokens", "cached_tokens")) -> None:
    path = GOLDEN_DIR / f"{name}.jsonl"
    lines = [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in normalize(events, counts)]
    if UPDATE_GOLDEN:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert path.exists(), f"{path} is missing; run with GLMKIT_UPDATE_GOLDEN=1 to write it"
    expected = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [json.loads(x) for x in expected], "\n".join(lines)


def test_golden_responses_stream(client, to_the_limit):
    events = stream_events(client, max_output_tokens=6, instructions="你好", metadata={"run": "golden"})
    assert any(e["type"] == "response.output_text.delta" for e in events), "the random model's text never streamed"
    check_golden("responses_stream", events)


def test_golden_responses_stream_tool_call(client, fixed_tool_call):
    # how long the random model takes to end a forced call is the grammar's business: output_tokens too is scrubbed
    check_golden("responses_stream_tool_call", stream_events(
        client, tools=[WEATHER_TOOL], tool_choice={"type": "function", "name": "get_weather"}),
        counts=("input_tokens", "total_tokens", "cached_tokens", "output_tokens"))


# --- the openai SDK in process ----------------------------------------------------------------------------------

def test_sdk_create_retrieve_input_items_delete(sdk):
    r = sdk.responses.create(model="tiny", input="你好", max_output_tokens=3, temperature=0)
    assert r.object == "response" and isinstance(r.output_text, str)
    assert sdk.responses.retrieve(r.id).output_text == r.output_text
    [item] = list(sdk.responses.input_items.list(r.id))
    assert item.type == "message" and item.role == "user" and item.content[0].text == "你好"
    sdk.responses.delete(r.id)
    import openai

    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(r.id)


def test_sdk_stream_helper_and_raw_stream(sdk, to_the_limit, length_is_stop):
    with sdk.responses.stream(model="tiny", input="你好", max_output_tokens=4, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas and final.output_text == "".join(deltas) and final.status == "completed"
    assert final.usage.output_tokens == 4
    raw = list(sdk.responses.create(model="tiny", input="你好", max_output_tokens=4, temperature=0, stream=True))
    assert raw[-1].type == "response.completed" and raw[-1].response.output_text == final.output_text


def test_sdk_stream_helper_of_an_incomplete_response(sdk, to_the_limit):
    # The helper's get_final_response() wants `response.completed`; an incomplete one ends `response.incomplete`
    # (as OpenAI streams it), which the helper hands over as an event.
    with sdk.responses.stream(model="tiny", input="你好", max_output_tokens=4, temperature=0) as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == "".join(e.delta for e in events
                                                      if e.type == "response.output_text.delta") != ""


def test_sdk_stream_helper_with_a_tool_call(sdk, fixed_tool_call):
    with sdk.responses.stream(model="tiny", input="北京天气？", tools=[WEATHER_TOOL],
                              tool_choice={"type": "function", "name": "get_weather"}) as stream:
        final = stream.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == FIXED_CALL.arguments


# --- fuzz: whatever schemathesis sends, never a 5xx ------------------------------------------------------------

@pytest.mark.parametrize("mode, examples", [("positive", 40), ("negative", 20)])
def test_fuzz_never_5xx(app, client, mode, examples):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    strategy = schemathesis.openapi.from_dict(app.openapi())[RESPONSES]["POST"].as_strategy(
        generation_mode=GenerationMode(mode))

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy, use_tiny=st.booleans())
    def run(case, use_tiny):
        if not isinstance(case.body, dict):
            return
        request_body = {**case.body, **({"model": "tiny"} if use_tiny else {})}
        if isinstance(request_body.get("max_output_tokens"), int):
            request_body["max_output_tokens"] = min(request_body["max_output_tokens"], 4)
        else:
            request_body["max_output_tokens"] = 4
        try:
            payload = json.dumps(request_body, allow_nan=False).encode()
        except (TypeError, ValueError):
            return
        r = client.post(RESPONSES, content=payload, headers={"content-type": "application/json"})
        assert r.status_code < 500, (r.status_code, r.text[:500], request_body)
        if r.status_code >= 400:
            assert_openai_error(r, r.status_code)

    run()
    assert state_of(app).in_flight == 0


# --- the real default model through the openai SDK (slow) ------------------------------------------------------

@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300) as c:
        yield c


def weather_tool() -> dict:
    from default_server import WEATHER_TOOL as chat_tool

    return {"type": "function", **chat_tool["function"]}


@pytest.mark.slow
def test_sdk_create_with_the_default_model(openai_client):
    from default_server import ARITHMETIC, MODEL

    r = openai_client.responses.create(model=MODEL, input=ARITHMETIC, max_output_tokens=16, temperature=0)
    assert r.status == "completed" and r.output_text.strip() == "5"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens >= 1
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens



@pytest.mark.slow
def test_sdk_previous_response_id_with_the_default_model(openai_client):
    from default_server import MODEL

    first = openai_client.responses.create(model=MODEL, input="My name is Alice. Reply with just OK.",
                                           max_output_tokens=8, temperature=0)
    second = openai_client.responses.create(model=MODEL, input="What is my name? Reply with just the name.",
                                            previous_response_id=first.id, max_output_tokens=8, temperature=0)
    assert second.output_text.strip().rstrip(".") == "Alice"


@pytest.mark.slow
def test_sdk_stream_with_the_default_model(openai_client):
    from default_server import COLORS, MODEL

    with openai_client.responses.stream(model=MODEL, input=COLORS, max_output_tokens=32, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) >= 2 and final.output_text == "".join(deltas) and final.output_text.count(",") >= 2
    assert openai_client.responses.retrieve(final.id).output_text == final.output_text


@pytest.mark.slow
def test_sdk_function_tool_round_trip(openai_client):
    from default_server import MODEL, WEATHER_EN

    instructions = "You are a helpful assistant. When a tool result is available, answer the user in one plain " \
                   "sentence using it."
    first = openai_client.responses.create(model=MODEL, input=WEATHER_EN, tools=[weather_tool()],
                                           instructions=instructions, max_output_tokens=48, temperature=0)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Beijing"}
    assert call.call_id.startswith("call_") and first.output_text == "" and first.status == "completed"
    result = json.dumps({"city": "Beijing", "condition": "sunny", "temperature_c": 25})
    second = openai_client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[weather_tool()], instructions=instructions,
        max_output_tokens=40, temperature=0,
        # the 0.5B model repeats the call unless asked once more (as in test_openai_tool_result_round_trip)
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": result},
               {"role": "user", "content": "Using the tool result, tell me the weather in one sentence."}])
    assert not [item for item in second.output if item.type == "function_call"] and second.status == "completed"
    # "sunny" and "25" are only in the tool result: it reached the prompt through previous_response_id's chain
    assert "25" in second.output_text and "sunny" in second.output_text.lower(), second.output_text


@pytest.mark.slow
def test_sdk_streamed_function_call(openai_client):
    from default_server import MODEL, WEATHER_EN

    with openai_client.responses.stream(model=MODEL, input=WEATHER_EN, tools=[weather_tool()],
                                        max_output_tokens=48, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert not [e for e in events if e.type == "response.output_text.delta"], "the call leaked into the text"
    [call] = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Beijing"}


@pytest.mark.slow
def test_sdk_parse_structured_output(openai_client):
    from pydantic import BaseModel

    from default_server import MODEL

    class Weather(BaseModel):
        city: str
        temperature_c: int

    r = openai_client.responses.parse(model=MODEL, input="In Beijing it is 22 degrees Celsius today. Extract the "
                                      "city and the temperature.", text_format=Weather, max_output_tokens=40,
                                      temperature=0)
    assert r.output_parsed == Weather(city="Beijing", temperature_c=22)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Weather"
