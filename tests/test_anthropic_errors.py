"""Anthropic's Messages API, its failures and its clients: errors in Anthropic's shape (also while streaming),
the key in `x-api-key`, the anthropic SDK against the tiny server, a schemathesis fuzz that never sees a 5xx, and
(slow) the anthropic SDK against the real default model. Request translation, shapes and tools:
test_anthropic.py."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from anthropic_support import COUNT, HEADERS, MESSAGES, WEATHER_TOOL, body, parse_events, post
from default_server import MODEL, WEATHER_EN
from glmkit.engine.outputs import Delta
from server_api_support import CHAT, LONG_TEXT, make_app, state_of, wait_until
from server_fixtures import free_port


# --- errors in Anthropic's shape ---------------------------------------------------------------------------

def assert_anthropic_error(r, status: int, type_: str, contains=()) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()
    assert set(err) == {"type", "error"} and err["type"] == "error", err
    assert set(err["error"]) == {"type", "message"} and err["error"]["type"] == type_, err
    for text in contains:
        assert text in err["error"]["message"], (text, err)
    return err["error"]["message"]


BAD = "invalid_request_error"
ERROR_CASES = [
    ("missing-max_tokens", MESSAGES, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, 400, BAD,
     ["max_tokens is required"]),
    ("max_tokens-zero", MESSAGES, body(max_tokens=0), 400, BAD, ["max_tokens=0"]),
    ("missing-messages", MESSAGES, {"model": "tiny", "max_tokens": 3}, 400, BAD, ["messages is required"]),
    ("empty-messages", MESSAGES, body(messages=[]), 400, BAD, ["messages"]),
    ("role", MESSAGES, body(messages=[{"role": "tool", "content": "x"}]), 400, BAD, ["messages[0].role"]),
    ("temperature", MESSAGES, body(temperature=1.5), 400, BAD, ["temperature=1.5"]),
    ("top_k", MESSAGES, body(top_k=-1), 400, BAD, ["top_k=-1"]),
    ("image-block", MESSAGES, body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
     400, BAD, ["messages[0].content[0]", "image"]),
    ("tool_use-missing-input", MESSAGES, body(messages=[{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f"}]}]), 400, BAD, ["messages[0].content[0].input"]),
    ("tool_result-in-assistant", MESSAGES, body(messages=[{"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]), 400, BAD, ["messages[0].content[0]"]),
    ("server-tool", MESSAGES, body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), 400, BAD,
     ["tools[0]"]),
    ("tool-name", MESSAGES, body(tools=[{**WEATHER_TOOL, "name": "a b"}]), 400, BAD, ["tools[0].name"]),
    ("tool_choice-no-name", MESSAGES, body(tools=[WEATHER_TOOL], tool_choice={"type": "tool"}), 400, BAD,
     ["tool_choice.name"]),
    ("tool_choice-unknown", MESSAGES, body(tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "nope"}),
     400, BAD, ["nope", "get_weather"]),
    ("tool_choice-any-no-tools", MESSAGES, body(tool_choice={"type": "any"}), 400, BAD, ["tool_choice"]),
    ("stop-empty", MESSAGES, body(stop_sequences=[""]), 400, BAD, ["stop_sequences[0]"]),
    ("context-length", MESSAGES, body(messages=[{"role": "user", "content": LONG_TEXT}]), 400, BAD, ["512"]),
    ("unknown-model", MESSAGES, body(model="claude-sonnet-4-5"), 404, "not_found_error",
     ["claude-sonnet-4-5", "tiny"]),
    ("count-unknown-model", COUNT, {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "not_found_error", ["nope"]),
    ("count-missing-messages", COUNT, {"model": "tiny"}, 400, BAD, ["messages is required"]),
    ("unknown-path", "/v1/messages/batches", {}, 404, "not_found_error", ["/v1/messages/batches"]),
]


@pytest.mark.parametrize("path, payload, status, type_, contains", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_errors_have_anthropic_shape(client, path, payload, status, type_, contains):
    assert_anthropic_error(client.post(path, json=payload, headers=HEADERS), status, type_, contains)


def test_invalid_json_and_wrong_method(client):
    r = client.post(MESSAGES, content=b'{"model": ', headers={"content-type": "application/json"})
    assert_anthropic_error(r, 400, BAD, ["not valid JSON"])
    assert_anthropic_error(client.get(MESSAGES), 405, BAD, ["GET"])


def test_other_paths_keep_openai_errors(client):
    r = client.post(CHAT, json={"model": "tiny"})
    assert r.status_code == 400 and set(r.json()) == {"error"} and r.json()["error"]["param"] == "messages"


def test_429_and_503_and_500(client, app, monkeypatch):
    state = state_of(app)
    monkeypatch.setattr(state.settings, "max_queue", 1)
    monkeypatch.setattr(state, "work_in_flight", 1)  # one sequence of another request runs
    assert_anthropic_error(post(client), 429, "rate_limit_error", ["max_queue=1"])
    monkeypatch.setattr(state, "work_in_flight", 0)
    monkeypatch.setattr(state.settings, "max_queue", 256)
    monkeypatch.setattr(state, "load_error", "boom")
    assert_anthropic_error(post(client), 503, "overloaded_error", ["boom"])
    monkeypatch.setattr(state, "load_error", None)

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail")
    monkeypatch.setattr(state.client.chat, "render", broken)
    message = assert_anthropic_error(post(client), 500, "api_error")
    assert "secret" not in message


def test_error_mid_stream_is_an_error_event(client, app, monkeypatch):
    async def failing(prompt_ids, params, request_id=None):
        yield Delta("x", 0, "", [5], num_prompt_tokens=len(prompt_ids), num_output_tokens=1)
        raise RuntimeError("engine fell over")

    monkeypatch.setattr(state_of(app).client, "generate", failing)
    events = parse_events(post(client, stream=True).text)
    assert [n for n, _ in events][:2] == ["message_start", "ping"]
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "api_error" and "engine fell over" in data["error"]["message"]
    assert state_of(app).in_flight == 0


@pytest.fixture(scope="module")
def auth_client(tiny_dir):
    with TestClient(make_app(tiny_dir, api_keys=["k1"]), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("path", [MESSAGES, COUNT])
def test_auth_with_x_api_key(auth_client, path):
    payload = body(max_tokens=2)
    for headers in ({}, {"x-api-key": "wrong"}, {"x-api-key": ""}, {"Authorization": "Bearer wrong"}):
        r = auth_client.post(path, json=payload, headers={**HEADERS, **headers})
        assert_anthropic_error(r, 401, "authentication_error", ["x-api-key"])
    for headers in ({"x-api-key": "k1"}, {"Authorization": "Bearer k1"}):
        assert auth_client.post(path, json=payload, headers={**HEADERS, **headers}).status_code == 200
    r = auth_client.post(CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.fixture(scope="module")
def live_url(tiny_dir):
    """The tiny model on a real uvicorn server (the SDK speaks httpx2, which TestClient is not)."""
    import uvicorn

    app = make_app(tiny_dir)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-anthropic-test", daemon=True)
    thread.start()
    assert wait_until(lambda: server.started or not thread.is_alive(), 60) and server.started
    yield f"http://127.0.0.1:{server.config.port}", app
    server.should_exit = True
    thread.join(15)


def test_sdk_against_the_tiny_model(live_url, monkeypatch):
    """The anthropic SDK itself: create, stream + accumulate, count_tokens, a typed error."""
    anthropic = pytest.importorskip("anthropic")
    url, app = live_url
    monkeypatch.setattr(state_of(app).llm.chat_format, "stop_token_ids", [])
    sdk = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
    kw = dict(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "你好"}],
              extra_body={"temperature": 0})  # the SDK no longer has sampling arguments
    msg = sdk.messages.create(**kw)
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 5
    with sdk.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == msg.content[0].text
    assert final.usage.output_tokens == 5 and final.stop_reason == "max_tokens" and final.id.startswith("msg_")
    counted = sdk.messages.count_tokens(model="tiny", messages=kw["messages"]).input_tokens
    assert counted == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    with pytest.raises(anthropic.NotFoundError) as e:
        sdk.messages.create(**{**kw, "model": "nope"})
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.create(**{**kw, "max_tokens": 0})


@pytest.mark.parametrize("mode, examples", [("positive", 25), ("negative", 12)])
@pytest.mark.parametrize("path", [MESSAGES, COUNT])
def test_fuzz_never_5xx_and_errors_keep_their_shape(tiny_dir, path, mode, examples):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    from server_api_support import FUZZ_SCALE

    app = make_app(tiny_dir)
    strategy = schemathesis.openapi.from_dict(app.openapi())[path]["POST"].as_strategy(
        generation_mode=GenerationMode(mode))
    with TestClient(app, raise_server_exceptions=False) as client:
        @settings(max_examples=max(1, int(examples * FUZZ_SCALE)), deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy, use_tiny=st.booleans())
        def run(case, use_tiny):
            payload = case.body
            if isinstance(payload, dict):
                payload = dict(payload)
                if use_tiny:
                    payload["model"] = "tiny"
                if isinstance(payload.get("max_tokens"), int) and payload["max_tokens"] > 4:
                    payload["max_tokens"] = 4
                for key in ("temperature", "top_p"):  # the sampler's known trouble with ~1e-38 (see test_server_ops)
                    if isinstance(payload.get(key), float) and 0 < payload[key] < 1e-6:
                        payload[key] = 1e-6
            try:
                data = json.dumps(payload, allow_nan=False).encode()
            except (TypeError, ValueError):
                return
            r = client.post(path, content=data, headers={"content-type": "application/json"})
            assert r.status_code < 500, (r.status_code, r.text[:500], payload)
            if r.status_code >= 400:
                assert_anthropic_error(r, r.status_code, r.json().get("error", {}).get("type"))
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert all(n != "error" for n, _ in parse_events(r.text)), r.text[-500:]

        run()
        state = state_of(app)
        assert wait_until(lambda: state.in_flight == 0 and state.llm.engine.counters()["kv_blocks_used"] == 0, 5)


# --- the real default model through the anthropic SDK (slow) ------------------------------------------------

GREEDY = {"temperature": 0}  # the SDK has no sampling arguments any more; the server still takes them


@pytest.fixture(scope="module")
def sdk(server):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=180)


@pytest.mark.slow
def test_sdk_create(sdk):
    msg = sdk.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, system="Reply with just the number.",
                              messages=[{"role": "user", "content": "What is 2+3?"}])
    assert msg.content[0].type == "text" and msg.content[0].text.strip() == "5"
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens >= 1


@pytest.mark.slow
def test_sdk_stream(sdk):
    with sdk.messages.stream(model=MODEL, max_tokens=12, extra_body=GREEDY,
                             messages=[{"role": "user", "content": "Name three colors, separated by commas."}]) as s:
        texts = list(s.text_stream)
        final = s.get_final_message()
    assert len(texts) >= 2 and "".join(texts) == final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens >= 2


@pytest.mark.slow
def test_sdk_tool_use_round_trip(sdk):
    system = "You are a helpful assistant. When a tool result is available, answer the user in one plain sentence using it."
    messages = [{"role": "user", "content": WEATHER_EN}]
    first = sdk.messages.create(model=MODEL, max_tokens=40, system=system, extra_body=GREEDY, tools=[WEATHER_TOOL],
                                messages=messages)
    assert first.stop_reason == "tool_use", first
    [call] = [b for b in first.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.input == {"city": "Beijing"} and call.id.startswith("toolu_")
    result = json.dumps({"city": "Beijing", "condition": "sunny", "temperature_c": 25})
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": [
                     {"type": "tool_result", "tool_use_id": call.id, "content": result},
                     # the 0.5B model repeats the call unless asked once more (as in test_server_clients)
                     {"type": "text", "text": "Using the tool result, tell me the weather in one sentence."}]}]
    second = sdk.messages.create(model=MODEL, max_tokens=40, system=system, extra_body=GREEDY,
                                 tools=[WEATHER_TOOL], messages=messages)
    assert second.stop_reason == "end_turn", second
    assert [b.type for b in second.content] == ["text"]
    text = second.content[0].text.lower()
    # "sunny" and "25" are only in the tool result: the server rendered it into the prompt
    assert "sunny" in text and "25" in text, text


@pytest.mark.slow
def test_sdk_count_tokens(sdk):
    messages = [{"role": "user", "content": "What is 2+3?"}]
    counted = sdk.messages.count_tokens(model=MODEL, messages=messages).input_tokens
    msg = sdk.messages.create(model=MODEL, max_tokens=1, messages=messages)
    assert counted == msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) > 5
