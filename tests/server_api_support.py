"""Shared by the in-process server API tests (test_server_errors, test_server_streams, test_server_ops): the tiny
model app, clients and helpers.

The HTTP server end to end, in process: OpenAI-shaped errors, auth, 503 while loading, 429 when the queue is
full, golden SSE transcripts, /v1/completions batching, the legacy ChatGLM `POST /`, /metrics, client
disconnects (on a real uvicorn server) and a schemathesis fuzz of every POST route.

The served model is a tiny random ChatGLM3 checkpoint, so its text is gibberish: the tests assert statuses,
shapes and invariants, never content. Golden SSE files live in tests/golden/sse/ (JSON lines, volatile fields
normalized); rewrite them with GLMKIT_UPDATE_GOLDEN=1.

Several tests pin server bugs found while writing this file (now fixed): surrogates, extreme sampling values,
late validation of streamed prompts, queue slots of abandoned streams, error parameter names.

Loaded as a pytest plugin by conftest.py, so its fixtures reach the test modules without an import.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from checkpoint_fixtures import make_chatglm_dir

from glmkit.chat.tool_calls import ParsedOutput, ToolCall
from glmkit.server.app import create_app
from glmkit.server.state import ServerSettings, ServerState

CHAT, COMPLETIONS, LEGACY, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/", "/v1/embeddings"
GOLDEN_DIR = Path(__file__).parent / "golden" / "sse"
UPDATE_GOLDEN = os.environ.get("GLMKIT_UPDATE_GOLDEN") == "1"
FUZZ_SCALE = float(os.environ.get("GLMKIT_FUZZ_SCALE", "1"))  # e.g. 20 for a long local fuzzing session
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
FIXED_CALL = ToolCall("get_weather", '{"city": "北京"}', "call_glmkitgolden0000000001")
# ~1000 tokens with the test tokenizer: more than the tiny model's 512-token context.
LONG_TEXT = "今天天气怎么样？北京晴，气温 22 度。" * 60


def make_app(model_dir: Path, load_in_background: bool = False, **settings):
    kwargs = dict(model=str(model_dir), embedding_model=None, served_model_names=["tiny"],
                  engine_kwargs=dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.02))
    kwargs.update(settings)
    return create_app(ServerSettings(**kwargs), load_in_background=load_in_background)


def chat_body(**overrides) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, **overrides}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, sp_model_path, sp):
    return make_chatglm_dir(tmp_path_factory.mktemp("server-tiny"), sp_model_path, sp.vocab_size, seed=11)


@pytest.fixture(scope="module")
def app(tiny_dir):
    return make_app(tiny_dir)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def fix_tool_calls(app, monkeypatch, call: ToolCall = FIXED_CALL) -> None:
    """The tiny model never writes a parsable call: its format's parse() (given tools) returns `call` instead (a
    new copy each time); without tools it parses as before."""
    fmt = state_of(app).llm.chat_format
    original = fmt.parse

    def parse(output_ids, tools=None):
        if tools:
            return ParsedOutput(content="", tool_calls=[ToolCall(call.name, call.arguments, call.id)])
        return original(output_ids, tools)

    monkeypatch.setattr(fmt, "parse", parse)


def state_of(app) -> ServerState:
    return app.state.glmkit


def wait_until(predicate, timeout_s: float = 5.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def assert_openai_error(r, status: int, param=..., code=..., type_=None, contains=()) -> dict:
    """The response is OpenAI's error object: exactly {"error": {"message", "type", "param", "code"}}."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    if type_ is not None:
        assert err["type"] == type_, err
    for text in contains:
        assert text in err["message"], (text, err)
    return err


def parse_sse(text: str) -> list:
    """`data: ...\\n\\n` events -> JSON objects (and the string "[DONE]"); checks the framing strictly."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def is_content_chunk(event) -> bool:
    return (isinstance(event, dict) and len(event["choices"]) == 1
            and set(event["choices"][0]["delta"]) == {"content"} and event["choices"][0]["finish_reason"] is None)
