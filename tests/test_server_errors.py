"""Server API: OpenAI-shaped errors (never 5xx), auth, 503 while loading, 429 when the queue is full."""

import gc
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from glmkit.server.state import ServerState
from server_api_support import (
    CHAT, COMPLETIONS, EMBEDDINGS, LEGACY, LONG_TEXT, WEATHER, assert_openai_error, chat_body, is_content_chunk,
    make_app, state_of, wait_until,
)


# --- 1. errors in OpenAI's shape, never 5xx -------------------------------------------------------------------

ERROR_CASES = [
    # id, path, body, status, param, code, substrings of the message
    ("missing-messages", CHAT, {"model": "tiny"}, 400, "messages", ..., ["messages"]),
    ("empty-messages", CHAT, chat_body(messages=[]), 400, "messages", ..., ["messages"]),
    ("temperature", CHAT, chat_body(temperature=5), 400, "temperature", ..., ["temperature", "5", "2"]),
    ("top_p", CHAT, chat_body(top_p=0), 400, "top_p", ..., ["top_p", "0"]),
    ("n-zero", CHAT, chat_body(n=0), 400, "n", ..., ["n=0", "1"]),
    ("n-too-big", CHAT, chat_body(n=17), 400, "n", ..., ["17", "16"]),
    ("max_tokens", CHAT, chat_body(max_tokens=0), 400, "max_tokens", ..., ["max_tokens=0", "1"]),
    ("role", CHAT, chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", ...,
     ["wizard"]),
    ("stop-empty", CHAT, chat_body(stop=[""]), 400, "stop", "invalid_value", ["stop"]),
    ("unknown-model", CHAT, chat_body(model="gpt-4o"), 404, "model", "model_not_found", ["gpt-4o", "tiny"]),
    ("context-length", CHAT, chat_body(messages=[{"role": "user", "content": LONG_TEXT}]), 400, "messages",
     "context_length_exceeded", ["512"]),
    ("tool_choice-unknown", CHAT,
     chat_body(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), 400,
     "tool_choice", "invalid_value", ["get_time", "get_weather"]),
    ("function_call-unknown", CHAT, chat_body(functions=[WEATHER["function"]], function_call={"name": "nope"}),
     400, ..., "invalid_value", ["nope"]),
    ("tool-name-pattern", CHAT, chat_body(tools=[{"type": "function", "function": {"name": "a b"}}]), 400,
     "tools[0].function.name", ..., ["a b"]),
    ("completions-temperature", COMPLETIONS, {"model": "tiny", "prompt": "hi", "temperature": 5}, 400,
     "temperature", ..., ["5", "2"]),
    ("completions-unknown-model", COMPLETIONS, {"model": "nope", "prompt": "hi"}, 404, "model", "model_not_found",
     ["nope", "tiny"]),
    ("completions-bad-token-id", COMPLETIONS, {"model": "tiny", "prompt": [10**6]}, 400, "prompt", "invalid_value",
     [str(10**6)]),
    ("completions-empty-prompt", COMPLETIONS, {"model": "tiny", "prompt": ""}, 400, "prompt", ..., ["empty"]),
    ("completions-context-length", COMPLETIONS, {"model": "tiny", "prompt": [5] * 600}, 400, ...,
     "context_length_exceeded", ["600", "512"]),
    ("legacy-missing-prompt", LEGACY, {"history": []}, 400, "prompt", ..., ["prompt"]),
    ("legacy-history-shape", LEGACY, {"prompt": "hi", "history": [["only the query"]]}, 400, "history[0]", ...,
     ["history[0]"]),
    ("legacy-temperature", LEGACY, {"prompt": "hi", "temperature": 5}, 400, "temperature", ..., ["5"]),
    ("embeddings-none-served", EMBEDDINGS, {"model": "tiny", "input": "hi"}, 404, "model", "model_not_found", []),
]


@pytest.mark.parametrize("path, body, status, param, code, contains",
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_have_openai_shape(client, path, body, status, param, code, contains):
    r = client.post(path, json=body)
    assert r.status_code < 500
    err = assert_openai_error(r, status, param, code, contains=contains)
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_invalid_json_is_400(client):
    r = client.post(CHAT, content=b'{"model": "tiny", "messages": [', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, type_="invalid_request_error", contains=["not valid JSON"])


def test_invalid_json_names_no_field(client):
    r = client.post(CHAT, content=b'{bad', headers={"content-type": "application/json"})
    assert_openai_error(r, 400)
    assert r.json()["error"]["param"] in (None, "body")


def test_completions_context_error_names_prompt(client):
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": [5] * 600})
    assert_openai_error(r, 400, param="prompt", code="context_length_exceeded")


def test_tool_choice_without_tools_is_400(client):
    r = client.post(CHAT, json=chat_body(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert_openai_error(r, 400, param="tool_choice")


LONE_SURROGATE_CASES = [
    (CHAT, '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}'),
    (COMPLETIONS, '{"model": "tiny", "max_tokens": 2, "prompt": "\\ud800"}'),
    (LEGACY, '{"prompt": "\\udfff", "max_length": 40}'),
]


@pytest.mark.parametrize("path, raw", LONE_SURROGATE_CASES, ids=["chat", "completions", "legacy"])
def test_lone_surrogate_is_replaced_not_a_server_error(client, path, raw):
    """JSON allows lone surrogate escapes; they are encoded as U+FFFD (the tokenizers cannot take them)."""
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("prompt", [[10**6], ""], ids=["bad-token-id", "empty"])
def test_streamed_completions_reject_bad_prompts_before_streaming(client, prompt):
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": prompt, "stream": True})
    assert_openai_error(r, 400, param="prompt")


@pytest.mark.parametrize("params", [dict(temperature=1e-40), dict(repetition_penalty=1e-40), dict(top_p=1e-300)],
                         ids=["temperature", "repetition_penalty", "top_p"])
def test_extreme_sampling_values_do_not_crash(client, params):
    r = client.post(CHAT, json=chat_body(**params))
    assert r.status_code == 200, r.text


def test_a_failing_request_does_not_fail_its_neighbours(client, app, monkeypatch):
    engine = state_of(app).llm.engine
    step = engine.step

    def slow_step():  # keep the bystander running while the bad request arrives
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with client.stream("POST", COMPLETIONS, json=body) as bystander:
        lines = bystander.iter_lines()
        assert next(lines).startswith("data: {")
        client.post(COMPLETIONS, json={"model": "tiny", "prompt": "hi", "max_tokens": 4, "temperature": 1e-40})
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest), rest[-2:]


# --- 2. auth --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_client(tiny_dir):
    with TestClient(make_app(tiny_dir, api_keys=["k1", "k2"]), raise_server_exceptions=False) as c:
        yield c


PROTECTED = [("GET", "/v1/models", None), ("GET", "/metrics", None), ("POST", CHAT, chat_body(max_tokens=2)),
             ("POST", COMPLETIONS, {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
             ("POST", EMBEDDINGS, {"model": "tiny", "input": "hi"}),
             ("POST", LEGACY, {"prompt": "hi", "max_length": 20})]


@pytest.mark.parametrize("method, path, body", PROTECTED, ids=[f"{m} {p}" for m, p, _ in PROTECTED])
def test_auth_required_on_every_route_but_health(auth_client, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"},
                    {"Authorization": "Bearer k1x"}, {"Authorization": "Bearer "}):
        r = auth_client.request(method, path, json=body, headers=headers)
        assert_openai_error(r, 401, type_="authentication_error", code="invalid_api_key")
    for key in ("Bearer k1", "Bearer k2", "bearer k2"):
        r = auth_client.request(method, path, json=body, headers={"Authorization": key})
        assert r.status_code != 401, (key, r.text)
        assert r.status_code == (404 if path == EMBEDDINGS else 200), r.text


def test_health_needs_no_auth(auth_client):
    r = auth_client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


# --- 3. 503 while the model loads -----------------------------------------------------------------------------

def test_503_while_loading_then_200(tiny_dir, monkeypatch):
    gate, original = threading.Event(), ServerState.load

    def gated_load(self):
        gate.wait(30)
        original(self)

    monkeypatch.setattr(ServerState, "load", gated_load)
    app = make_app(tiny_dir, load_in_background=True)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.get("/health")
            assert r.status_code == 503 and r.json() == {"status": "loading"}
            for method, path, body in PROTECTED:
                r = c.request(method, path, json=body)
                if path == "/metrics":
                    assert r.status_code == 200 and "glmkit_ready 0" in r.text
                    continue
                assert_openai_error(r, 503, code="model_loading", type_="server_error")
                assert r.headers.get("retry-after", "").isdigit(), r.headers
            r = c.post(CHAT, json=chat_body(stream=True))
            assert_openai_error(r, 503, code="model_loading")

            gate.set()
            assert wait_until(lambda: state_of(app).ready, 30)
            assert c.get("/health").status_code == 200
            assert "glmkit_ready 1" in c.get("/metrics").text
            assert c.get("/v1/models").status_code == 200
            assert c.post(CHAT, json=chat_body(max_tokens=2)).status_code == 200
    finally:
        gate.set()


# --- 4. 429 when max_queue requests are in flight --------------------------------------------------------------

def test_429_while_queue_is_full(tiny_dir):
    app = make_app(tiny_dir, max_queue=1)
    with TestClient(app, raise_server_exceptions=False) as c:
        state = state_of(app)
        # TestClient hands body chunks over one at a time: while we do not read, the stream stays in flight.
        with c.stream("POST", CHAT, json=chat_body(stream=True, max_tokens=8)) as held:
            assert held.status_code == 200
            assert state.in_flight == 1
            for method, path, body in [("POST", CHAT, chat_body(max_tokens=2)),
                                       ("POST", CHAT, chat_body(max_tokens=2, stream=True)),
                                       ("POST", COMPLETIONS, {"model": "tiny", "prompt": "hi", "max_tokens": 2}),
                                       ("POST", LEGACY, {"prompt": "hi", "max_length": 20})]:
                r = c.request(method, path, json=body)
                assert_openai_error(r, 429, type_="rate_limit_error", code="queue_full", contains=["max_queue=1"])
                assert r.headers.get("retry-after", "").isdigit(), r.headers
            # Non-generating routes are not queued.
            assert c.get("/v1/models").status_code == 200
            assert c.get("/health").status_code == 200
            lines = [line for line in held.iter_lines() if line]
            assert lines[-1] == "data: [DONE]"
        assert wait_until(lambda: state.in_flight == 0, 5)
        assert c.post(CHAT, json=chat_body(max_tokens=2)).status_code == 200
        r = c.post(COMPLETIONS, json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert state.in_flight == 0


def test_abandoned_stream_releases_its_queue_slot(tiny_dir):
    app = make_app(tiny_dir, max_queue=1)
    with TestClient(app, raise_server_exceptions=False) as c:
        state = state_of(app)
        state.llm.chat_format.stop_token_ids = []  # this app's own: the reply surely has text
        gc.disable()  # make the outcome independent of when the cyclic collector happens to run
        try:
            body = chat_body(stream=True, max_tokens=6, temperature=0, ignore_eos=True)
            with c.stream("POST", CHAT, json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and is_content_chunk(json.loads(line[6:])):
                        break  # leave after the text, before the finish chunk and `data: [DONE]`
                else:
                    pytest.fail("the stream had no content chunk")
            released = wait_until(lambda: state.in_flight == 0, 2)
            follow_up = c.post(CHAT, json=chat_body(max_tokens=2)).status_code
        finally:
            gc.enable()
            gc.collect()
            time.sleep(0.1)
        assert released, f"in_flight={state.in_flight} after the client left"
        assert follow_up == 200


def test_client_gone_before_the_stream_starts_releases_its_slot(tiny_dir):
    app = make_app(tiny_dir, max_queue=1)
    with TestClient(app, raise_server_exceptions=False) as c:
        async def call_with_gone_client():
            messages = [{"type": "http.request", "body": json.dumps(chat_body(stream=True)).encode(),
                         "more_body": False}]

            async def receive():
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message):
                raise OSError("the client has gone")  # what ASGI 2.4 servers do after a disconnect

            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": CHAT, "raw_path": CHAT.encode(),
                     "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
                     "server": ("testserver", 80), "state": {},
                     "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")]}
            try:
                await app(scope, receive, send)
            except Exception:  # noqa: BLE001 - the server may report the disconnect by raising
                pass

        c.portal.call(call_with_gone_client)
        gc.collect()
        assert wait_until(lambda: state_of(app).in_flight == 0, 2), f"in_flight={state_of(app).in_flight}"
        assert c.post(CHAT, json=chat_body(max_tokens=2)).status_code == 200


def test_a_model_by_id(client):
    r = client.get("/v1/models/tiny")
    assert r.status_code == 200 and r.json()["id"] == "tiny" and r.json()["object"] == "model"
    assert_openai_error(client.get("/v1/models/no-such-model"), 404, param="model", code="model_not_found",
                        contains=("tiny",))


def test_unknown_routes_and_methods_answer_in_openai_shape(client):
    assert_openai_error(client.get("/v1/no-such-route"), 404, param=None, code="not_found",
                        contains=("/v1/no-such-route",))
    assert_openai_error(client.get(CHAT), 405, param=None, code="method_not_allowed")


def test_default_max_tokens_bounds_a_request_that_sets_none(tiny_dir):
    app = make_app(tiny_dir, default_max_tokens=5)
    with TestClient(app) as c:
        state_of(app).llm.chat_format.stop_token_ids = []  # this app's own: only the length can end the answer
        body = chat_body(ignore_eos=True)
        del body["max_tokens"]
        r = c.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["finish_reason"] == "length"
        assert c.post(CHAT, json=chat_body(ignore_eos=True, max_tokens=7)).json()["usage"]["completion_tokens"] == 7
