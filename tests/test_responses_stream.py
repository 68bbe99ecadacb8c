"""OpenAI's Responses API streamed: event order (the same items as the plain response), tool calls, logprobs, a
failure mid-stream, golden SSE transcripts; the openai SDK in process (`responses.create`, `responses.stream`);
a schemathesis fuzz that never sees a 5xx; and (slow) the real default model through the openai SDK
(`responses.create`, `responses.stream`, a function-tool round trip, `responses.parse`). The object, translation,
storage and errors: test_responses.py.
"""

from __future__ import annotations

import copy
import json

import pytest

from responses_support import RESPONSES, WEATHER_TOOL, body, create, output_text, parse_events
from responses_support import fixed_tool_call, length_is_stop, prompts, sdk, to_the_limit  # noqa: F401,F811 - fixtures
from server_api_support import FIXED_CALL, GOLDEN_DIR, UPDATE_GOLDEN, assert_openai_error, state_of


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
