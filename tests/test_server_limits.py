"""What one request may ask of the server: body size (413), read deadlines for headers and body (408), the
connection cap (503), the per-request deadline (--request-timeout), admission by sequences (prompts x n), the
prompt-size check before tokenizing, the schema's counts (tools, stop strings, prompts), strict types, and
error messages that quote at most a short excerpt of what was sent.

In process (TestClient) where the rule lives in the app; real `glmkit serve` processes where it lives in the
connection (read deadlines, connection cap) or needs real time to pass (the request deadline).
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from server_api_support import (CHAT, COMPLETIONS, EMBEDDINGS, LEGACY, assert_openai_error, chat_body, make_app,
                                state_of, wait_until)
from server_fixtures import ServerProcess

from glmkit.server.limits import Limits, check_prompt_size, text_bytes

MESSAGES, RESPONSES = "/v1/messages", "/v1/responses"
SERVE_ARGS = ("--served-model-name", "tiny", "--embedding-model", "none", "--dtype", "float32", "--threads", "1",
              "--kv-cache-memory", "0.02", "--max-model-len", "8192")


@pytest.fixture(scope="module")
def small_app(tiny_dir):
    return make_app(tiny_dir, limits=Limits(max_body_bytes=64 * 1024), max_queue=4)


@pytest.fixture(scope="module")
def small(small_app):
    with TestClient(small_app, raise_server_exceptions=False) as c:
        yield c


# --- body size ------------------------------------------------------------------------------------------------

def test_a_body_over_the_limit_is_413_before_it_is_read(small):
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 100_000}])).encode()
    r = small.post(CHAT, content=big, headers={"content-type": "application/json"})
    error = assert_openai_error(r, 413, code="request_too_large", contains=["100", "65536", "--max-body-size"])
    assert len(r.content) < 600 and r.headers["connection"] == "close"
    assert error["param"] is None


def test_a_chunked_body_is_cut_at_the_limit(small):
    def chunks():  # no Content-Length: the size is only known while reading
        for _ in range(100):
            yield b"x" * 1024

    r = small.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large", contains=["more than 65536 bytes"])
    r = small.post(MESSAGES, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"  # Anthropic's shape


def test_a_body_under_the_limit_is_served(small):
    r = small.post(CHAT, json=chat_body())
    assert r.status_code == 200, r.text


# --- schema counts, strict types, excerpts --------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("body, param", [
    (chat_body(tools=[TOOL] * 129), "tools"),
    (chat_body(stop=["a"] * 17), "stop"),
    (chat_body(stop="x" * 1001), "stop"),
    (chat_body(temperature=False), "temperature"),
    (chat_body(max_tokens=True), "max_tokens"),
    (chat_body(n="2"), "n"),
    (chat_body(stream=1), "stream"),
    ({"model": "tiny", "prompt": [[False]], "max_tokens": 2}, "prompt"),
    ({"model": "tiny", "prompt": [True, 5], "max_tokens": 2}, "prompt"),
    ({"model": "tiny", "prompt": ["a"] * 257, "max_tokens": 2}, "prompt"),
    ({"prompt": "hi", "temperature": True}, "temperature"),
], ids=["129-tools", "17-stops", "long-stop", "bool-temperature", "bool-max-tokens", "string-n", "int-stream",
        "bool-token-id", "bool-in-ids", "257-prompts", "legacy-bool-temperature"])
def test_counts_and_types_are_checked_by_the_schema(client, body, param):
    path = COMPLETIONS if "prompt" in body and "model" in body else LEGACY if "prompt" in body else CHAT
    assert_openai_error(client.post(path, json=body), 400, param=param)


def test_the_schema_states_the_limits(app):
    schema = json.dumps(app.openapi())
    assert '"maxItems": 128' in schema and '"maxItems": 16' in schema and '"maxLength": 1000' in schema


@pytest.mark.parametrize("path, body", [
    (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": "9" * 1_000_000}),
    (CHAT, {"model": "m" * 1_000_000, "messages": [{"role": "user", "content": "hi"}]}),
    (COMPLETIONS, {"model": "tiny", "prompt": "hi", "stop": "s" * 1_000_000}),
], ids=["wrong-type", "unknown-model", "too-long"])
def test_errors_quote_a_short_excerpt(client, path, body):
    r = client.post(path, json=body)
    assert 400 <= r.status_code < 500 and len(r.content) < 1000, (r.status_code, len(r.content))
    assert "..." in r.json()["error"]["message"]


def test_a_large_text_body_is_not_echoed(client):
    r = client.post(CHAT, content=b"hello " * 500_000, headers={"content-type": "text/plain"})
    assert_openai_error(r, 400)
    assert len(r.content) < 1000


# --- text hygiene: the same answer on every route ----------------------------------------------------------------

@pytest.mark.parametrize("path, raw", [
    (CHAT, '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\u0000b\\ud800"}]}'),
    (COMPLETIONS, '{"model": "tiny", "max_tokens": 2, "prompt": "a\\u0000b\\udfff"}'),
    (LEGACY, '{"prompt": "a\\u0000b\\ud800", "max_length": 40}'),
    (RESPONSES, '{"model": "tiny", "max_output_tokens": 2, "input": "a\\u0000b\\ud800"}'),
    (MESSAGES, '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\u0000\\ud800"}]}'),
], ids=["chat", "completions", "legacy", "responses", "messages"])
def test_nul_and_lone_surrogates_are_served_on_every_route(client, path, raw):
    """NUL is ordinary text; a lone surrogate (valid as a JSON escape, not as text) becomes U+FFFD."""
    r = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, LEGACY, RESPONSES, MESSAGES, EMBEDDINGS])
def test_undecodable_bytes_are_a_400_on_every_route(client, path):
    r = client.post(path, content=b'{"model": "tiny", "prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "JSON" in r.text


# --- prompt size before tokenizing ------------------------------------------------------------------------------

def test_text_that_cannot_fit_is_refused_without_tokenizing(client, app, monkeypatch):
    state = state_of(app)
    client.post(CHAT, json=chat_body())  # loaded

    def no_render(*args, **kwargs):
        raise AssertionError("the prompt was tokenized")

    monkeypatch.setattr(state.client.chat, "render", no_render)
    huge = "测试" * 400_000  # 2.4 MB of text
    start = time.monotonic()
    r = client.post(CHAT, json=chat_body(messages=[{"role": "user", "content": huge}]))
    assert_openai_error(r, 400, param="messages", code="context_length_exceeded", contains=["at least"])
    assert time.monotonic() - start < 2
    r = client.post(MESSAGES, json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": huge}]})
    assert r.status_code == 400 and "at least" in r.json()["error"]["message"]


def test_the_size_bound_never_refuses_what_fits(app, client):
    """Text the bound refuses really has more tokens than the context; text it lets through may or may not."""
    client.post(CHAT, json=chat_body())
    engine_client = state_of(app).client
    tokenizer = engine_client.tokenizer
    for text in ["a" * 5000, "北京天气" * 2000, "  \n " * 5000 + "x", "😀" * 3000, "ab12" * 3000]:
        least = text_bytes(text) // (engine_client.max_token_bytes * 4)
        assert least <= len(tokenizer.encode(text)), text[:20]
    assert text_bytes({"a": ["x y", {"k": "中"}], "n": 3}) == 2 + 3
    check_prompt_size("short", engine_client, "messages")


# --- admission by work -------------------------------------------------------------------------------------------

def test_admission_counts_sequences(small, small_app):
    state = state_of(small_app)
    r = small.post(COMPLETIONS, json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 2})
    assert_openai_error(r, 400, param="n", contains=["6 sequences", "at most 4", "--max-queue"])
    state.work_in_flight = 3  # three sequences of other requests run
    try:
        r = small.post(COMPLETIONS, json={"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2})
        assert_openai_error(r, 429, code="queue_full", contains=["3 sequences"])
        r = small.post(COMPLETIONS, json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        state.work_in_flight = 0
    assert state.in_flight == 0 and state.work_in_flight == 0


def test_admission_counts_tokens(small, small_app):
    """Prompt + max_tokens of every sequence against --max-queue-tokens (default: four times the KV cache)."""
    state = state_of(small_app)
    assert state.token_limit == 4 * state.client.kv_tokens
    state.settings.max_queue_tokens = 100
    try:
        r = small.post(COMPLETIONS, json={"model": "tiny", "prompt": "a", "n": 2, "max_tokens": 60})
        assert_openai_error(r, 400, param="max_tokens", contains=["at most 100", "--max-queue-tokens"])
        state.tokens_in_flight = 50  # other requests' work
        r = small.post(CHAT, json=chat_body(max_tokens=60))
        assert_openai_error(r, 429, code="queue_full", contains=["50 tokens of work in flight"])
        assert r.headers["retry-after"] == "1"
        assert "\nglmkit_admitted_tokens 50\n" in small.get("/metrics").text
        r = small.post(CHAT, json=chat_body(max_tokens=4))
        assert r.status_code == 200, r.text
        state.tokens_in_flight = 0
        r = small.post(COMPLETIONS, json={"model": "tiny", "prompt": "a", "n": 2, "max_tokens": 40})
        assert r.status_code == 200, r.text
    finally:
        state.settings.max_queue_tokens, state.tokens_in_flight = None, 0
    assert state.in_flight == 0 and state.work_in_flight == 0 and state.tokens_in_flight == 0


# --- in real servers: read deadlines, the connection cap, the request deadline -------------------------------------

@pytest.fixture(scope="module")
def guarded(tiny_dir):
    server = ServerProcess("--model", str(tiny_dir), *SERVE_ARGS, "--read-timeout", "1", "--max-connections", "3",
                           "--request-timeout", "3")
    try:
        yield server
    finally:
        server.stop()


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_headers_that_do_not_arrive_in_time_are_408(guarded):
    with _connect(guarded) as silent, _connect(guarded) as slow:
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        start = time.monotonic()
        answers = [_read_all(silent), _read_all(slow)]
        elapsed = time.monotonic() - start
    assert 0.5 < elapsed < 5, elapsed
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_a_body_that_does_not_arrive_in_time_is_408(guarded):
    with _connect(guarded) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"--read-timeout" in answer


def test_connections_beyond_the_cap_are_503(guarded):
    socks = [_connect(guarded) for _ in range(3)]
    try:
        time.sleep(0.2)
        with _connect(guarded) as extra:
            answer = _read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
    finally:
        for s in socks:
            s.close()
    # the held connections close (read deadline); the server answers again
    assert wait_until(lambda: httpx.get(guarded.url + "/health", timeout=5).status_code == 200, 10, 0.2)


def test_a_request_past_its_deadline_is_aborted(guarded):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 7000, "ignore_eos": True}
    start = time.monotonic()
    r = httpx.post(guarded.url + COMPLETIONS, json=body, timeout=60)
    assert 2.5 < time.monotonic() - start < 10
    assert_openai_error(r, 408, code="request_timeout", contains=["--request-timeout"])
    assert r.headers["x-should-retry"] == "false"
    with httpx.stream("POST", guarded.url + COMPLETIONS, json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and len(lines) > 1
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "request_timeout"

    def idle():
        text = httpx.get(guarded.url + "/metrics", timeout=5).text
        return "\nglmkit_kv_blocks_used 0\n" in text and "\nglmkit_http_requests_in_flight 0\n" in text

    assert wait_until(idle, 10, 0.2)
    assert "abort=request_timeout" in guarded.output()


def test_large_text_is_estimated_from_samples(sp):
    """Past 1 MB the density of three samples decides: text that would need more than twice the context at its
    sparsest sample is refused; the estimate never refuses text that fits."""
    from types import SimpleNamespace

    text = "今天天气很好，我们去公园散步吧。" * 45_000  # 2 MB
    tokens = len(sp.encode(text[:100_000])) * len(text) // 100_000
    loose = SimpleNamespace(max_token_bytes=50, max_model_len=tokens // 3, tokenizer=sp)  # passes the bound
    with pytest.raises(Exception) as e:
        check_prompt_size([{"role": "user", "content": text}], loose, "messages")
    assert "estimated from samples" in e.value.message
    roomy = SimpleNamespace(max_token_bytes=50, max_model_len=tokens + 10, tokenizer=sp)
    check_prompt_size([{"role": "user", "content": text}], roomy, "messages")
    # dense text at the start, sparse text after: the sparsest sample sets the estimate
    mixed = "😀" * 20_000 + "a" * 3_000_000
    fits = SimpleNamespace(max_token_bytes=50, max_model_len=len(sp.encode(mixed)) + 10, tokenizer=sp)
    check_prompt_size(mixed, fits, "prompt")
