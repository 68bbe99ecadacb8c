"""The server's lifecycle: graceful shutdown on SIGTERM/SIGINT (real `glmkit serve` processes), liveness and
readiness, the one auth rule (docs included), request ids and the access log (in process).

The served model is the tiny random ChatGLM3 checkpoint of server_api_support.py. Streams that must outlive a
drain ask for thousands of tokens (the real servers run with --max-model-len 8192), so they are still running
whatever the machine's speed; the one stream that must finish first asks for 150.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from server_api_support import CHAT, COMPLETIONS, assert_openai_error, chat_body, make_app, state_of, wait_until
from server_fixtures import ServerProcess

from glmkit.cli import parse
from glmkit.server.lifecycle import ServerShuttingDown

MESSAGES, RESPONSES = "/v1/messages", "/v1/responses"
# One torch thread: the test's own threads share the machine's cores, and torch's thread barriers stall when
# they do (args.one_core_free), which made stream speed vary tenfold.
SERVE_ARGS = ("--served-model-name", "tiny", "--embedding-model", "none", "--dtype", "float32", "--threads", "1",
              "--kv-cache-memory", "0.02", "--max-model-len", "8192")
DOC_PATHS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")


# --- graceful shutdown of a real `glmkit serve` ----------------------------------------------------------------

def serve(tiny_dir, *args: str) -> ServerProcess:
    server = ServerProcess("--model", str(tiny_dir), *SERVE_ARGS, *args)
    # The first request of a process is slow (one-time set-up); keep it out of the timed part.
    r = httpx.post(server.url + COMPLETIONS, json={"model": "tiny", "prompt": "Hi", "max_tokens": 20}, timeout=120)
    assert r.status_code == 200, r.text
    return server


class Stream(threading.Thread):
    """A /v1/completions stream read on its own thread; `lines` are its non-empty SSE lines."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.lines: list[str] = []
        self.status, self.failure = None, None
        self.first_chunk = threading.Event()
        self.start()

    def run(self):
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", self.url + COMPLETIONS, json=body, timeout=60) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.first_chunk.set()
        except httpx.HTTPError as e:
            self.failure = e
        finally:
            self.first_chunk.set()

    def last_event(self):
        payload = self.lines[-1].removeprefix("data: ")
        return payload if payload == "[DONE]" else json.loads(payload)


def wait_for_line(server: ServerProcess, text: str, timeout_s: float = 10) -> bool:
    return wait_until(lambda: text in server.output(), timeout_s, 0.05)


def test_sigterm_drains_then_aborts_and_exits_0(tiny_dir):
    server = serve(tiny_dir, "--shutdown-timeout", "5")
    try:
        with httpx.stream("POST", server.url + COMPLETIONS, headers={"X-Request-Id": "leaver"}, timeout=60,
                          json={"model": "tiny", "prompt": "Hi", "max_tokens": 8000, "ignore_eos": True,
                                "stream": True}) as r:
            next(r.iter_lines())  # one chunk, then the client goes away
        assert wait_for_line(server, "request_id=leaver"), server.output()[-2000:]
        assert "abort=client_disconnected" in server.output()
        short, longs = Stream(server.url, 150), [Stream(server.url, 8000) for _ in range(9)]
        for s in [short, *longs]:
            assert s.first_chunk.wait(60) and s.failure is None and s.status == 200, s.failure
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert wait_for_line(server, "SIGTERM: draining 10 running requests"), server.output()[-2000:]

        # Draining: new work gets 503 in the API's own error shape, on an open socket; the probes answer.
        r = httpx.post(server.url + CHAT, json=chat_body(), timeout=5)
        assert_openai_error(r, 503, code="server_shutting_down", type_="server_error")
        assert r.headers["retry-after"] and r.headers["x-request-id"]
        r = httpx.post(server.url + MESSAGES, json={"model": "tiny", "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}]}, timeout=5)
        assert r.status_code == 503 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "overloaded_error"
        health, ready = httpx.get(server.url + "/health", timeout=5), httpx.get(server.url + "/ready", timeout=5)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}

        assert server.proc.wait(30) == 0
        elapsed = time.monotonic() - sent
        assert 5 <= elapsed < 15, elapsed  # the 5 s drain, then the abort and exit (no uvicorn wait without end)
        for s in [short, *longs]:
            s.join(10)
            assert not s.is_alive() and s.failure is None, s.failure
        # The stream that could finish in time did, normally; the others end with one error event each.
        assert short.last_event() == "[DONE]", [len(s.lines) for s in [short, *longs]]
        assert not any('"error"' in line for line in short.lines)
        for s in longs:
            event = s.last_event()
            assert set(event) == {"error"} and set(event["error"]) == {"message", "type", "param", "code"}, event
            assert "shutting down" in event["error"]["message"] and event["error"]["type"] == "server_error"
        log = server.output()
        assert "1 finished, 9 aborted, 0 still open; KV blocks in use: 0; engine stopped" in log, log[-3000:]
        assert log.count("abort=shutdown") == 9 and log.count("route=/v1/completions status=200") == 12
        assert "Traceback" not in log
    finally:
        server.stop()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_ends_the_drain_at_once(tiny_dir, sig, code):
    server = serve(tiny_dir, "--shutdown-timeout", "60")
    try:
        streams = [Stream(server.url, 8000) for _ in range(2)]
        for s in streams:
            assert s.first_chunk.wait(60) and s.status == 200
        server.proc.send_signal(sig)
        assert wait_for_line(server, f"{sig.name}: draining 2 running requests"), server.output()[-2000:]
        sent = time.monotonic()
        server.proc.send_signal(sig)
        assert server.proc.wait(15) == code
        assert time.monotonic() - sent < 5
        for s in streams:
            s.join(10)
            assert not s.is_alive()
            assert s.failure is not None or "shutting down" in s.last_event()["error"]["message"]
        assert "again: stopping now" in server.output() and "Traceback" not in server.output()
    finally:
        server.stop()


# --- what each route sends when the drain aborts its request (in process) --------------------------------------

@pytest.fixture
def slow_app(tiny_dir, monkeypatch):
    """A fresh app (an abort_all or a dead engine is final) whose steps are slowed down, without stop tokens."""
    app = make_app(tiny_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        engine, step = state_of(app).llm.engine, state_of(app).llm.engine.step

        def slow_step():
            time.sleep(0.01)
            return step()

        monkeypatch.setattr(engine, "step", slow_step)
        monkeypatch.setattr(state_of(app).llm.chat_format, "stop_token_ids", [])
        yield app, client


def test_aborted_requests_end_cleanly_on_every_route(slow_app):
    app, client = slow_app
    state, long = state_of(app), dict(max_tokens=400, ignore_eos=True)
    requests = {
        "chat": (CHAT, chat_body(stream=True, **long)),
        "chat-plain": (CHAT, chat_body(**long)),
        "completions": (COMPLETIONS, {"model": "tiny", "prompt": "Hi", "stream": True, **long}),
        "anthropic": (MESSAGES, {"model": "tiny", "max_tokens": 400, "stream": True,
                                 "messages": [{"role": "user", "content": "hi"}]}),
        "responses": (RESPONSES, {"model": "tiny", "input": "hi", "max_output_tokens": 400, "stream": True}),
    }
    answers = {}

    def send(name, path, body):
        answers[name] = client.post(path, json=body)

    threads = [threading.Thread(target=send, args=(name, *req)) for name, req in requests.items()]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(state.llm.engine.seqs) == len(requests), 20)
    state.client.abort_all(ServerShuttingDown("the server is shutting down; retry"))
    for t in threads:
        t.join(20)
        assert not t.is_alive()

    chat = answers["chat"].text.strip().split("\n\n")
    assert json.loads(chat[-1].removeprefix("data: "))["error"]["type"] == "server_error"
    assert "shutting down" in chat[-1] and "[DONE]" not in answers["chat"].text
    assert_openai_error(answers["chat-plain"], 503, code="server_shutting_down", contains=("shutting down",))
    completions = answers["completions"].text.strip().split("\n\n")
    assert "shutting down" in json.loads(completions[-1].removeprefix("data: "))["error"]["message"]
    name, data = answers["anthropic"].text.strip().split("\n\n")[-1].split("\n")
    assert name == "event: error" and json.loads(data.removeprefix("data: "))["error"]["type"] == "overloaded_error"
    *_, error, failed = answers["responses"].text.strip().split("\n\n")
    assert error.startswith("event: error\n") and failed.startswith("event: response.failed\n")
    assert json.loads(failed.split("\n")[1].removeprefix("data: "))["response"]["status"] == "failed"
    assert wait_until(lambda: state.llm.engine.counters()["kv_blocks_used"] == 0 and state.in_flight == 0, 5)
    # Anything sent after the abort is refused at once, never left waiting.
    assert_openai_error(client.post(CHAT, json=chat_body()), 503, code="server_shutting_down")


def test_draining_gate_in_process(client, app):
    state = state_of(app)
    state.draining = True
    try:
        r = client.post(CHAT, json=chat_body())
        assert_openai_error(r, 503, code="server_shutting_down")
        assert r.headers["retry-after"] == "5"
        assert client.post(MESSAGES, json={}).json()["error"]["type"] == "overloaded_error"
        assert client.get("/v1/models").status_code == 503
        assert client.get("/health").status_code == 200
        assert client.get("/ready").json() == {"status": "draining"}
        assert client.get("/metrics").status_code == 200  # watching a drain is not new work
    finally:
        state.draining = False
    assert client.get("/ready").json() == {"status": "ready"}


# --- liveness and readiness ------------------------------------------------------------------------------------

def test_health_and_ready_when_the_engine_thread_dies(tiny_dir, monkeypatch):
    class Crash(BaseException):
        pass

    app = make_app(tiny_dir)
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 200 and client.get("/ready").json() == {"status": "ready"}

        def crash():
            raise Crash("the device fell off the bus")

        monkeypatch.setattr(state_of(app).llm.engine, "step", crash)
        r = client.post(CHAT, json=chat_body())  # its caller hears of it instead of waiting forever
        assert r.status_code == 500
        assert wait_until(lambda: client.get("/health").status_code == 503, 5)
        assert client.get("/health").json() == {"status": "engine stopped"}
        assert client.get("/ready").status_code == 503 and client.get("/ready").json()["status"] == "engine stopped"
        assert_openai_error(client.post(CHAT, json=chat_body()), 503, code="engine_stopped")
        assert client.get("/metrics").status_code == 200


def test_health_when_a_step_is_stuck(tiny_dir, monkeypatch):
    app = make_app(tiny_dir, engine_stall_s=0.3)
    gate = threading.Event()
    with TestClient(app, raise_server_exceptions=False) as client:
        engine = state_of(app).llm.engine
        step = engine.step

        def stuck_step():
            gate.wait(20)
            return step()

        monkeypatch.setattr(engine, "step", stuck_step)
        answer = {}
        thread = threading.Thread(target=lambda: answer.setdefault("r", client.post(CHAT, json=chat_body())))
        thread.start()
        try:
            assert wait_until(lambda: client.get("/health").status_code == 503, 5)
            body = client.get("/health").json()
            assert body["status"] == "engine stuck" and "--engine-stall-timeout" in body["error"]
            assert client.get("/ready").json()["status"] == "engine stuck"
        finally:
            gate.set()
        thread.join(20)
        assert answer["r"].status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200


def test_health_is_503_while_loading(tiny_dir):
    from glmkit.server.state import ServerSettings, ServerState

    state = ServerState(ServerSettings())
    assert state.liveness() == (503, {"status": "loading"}) and state.readiness() == (503, {"status": "loading"})


# --- one auth rule ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("open_docs", [False, True], ids=["closed-docs", "open-docs"])
def test_docs_follow_the_key_unless_opened(tiny_dir, open_docs):
    with TestClient(make_app(tiny_dir, api_keys=["k1"], open_docs=open_docs), raise_server_exceptions=False) as c:
        for path in DOC_PATHS:
            r = c.get(path)
            if open_docs:
                assert r.status_code == 200, (path, r.text[:200])
            else:
                assert_openai_error(r, 401, code="invalid_api_key")
            assert c.get(path, headers={"Authorization": "Bearer k1"}).status_code == 200, path
        for path in ("/health", "/ready"):
            assert c.get(path).status_code == 200, path
        assert c.get("/v1/models").status_code == 401 and c.get("/metrics").status_code == 401


# --- request ids and the access log ----------------------------------------------------------------------------

def access_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "glmkit.access"]


def test_request_id_is_echoed_or_made(client):
    assert client.get("/v1/models", headers={"X-Request-Id": "trace-42 abc"}).headers["x-request-id"] == "trace-42 abc"
    made = {client.get("/v1/models").headers["x-request-id"] for _ in range(2)}
    assert len(made) == 2 and all(len(i) == 32 for i in made)
    for bad in ("x" * 129, "caf\xe9", "   "):
        r = client.get("/v1/models", headers={"X-Request-Id": bad.encode("latin-1")})
        assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32
    # Errors and streams carry it too.
    assert client.get("/nope", headers={"X-Request-Id": "e1"}).headers["x-request-id"] == "e1"
    streamed = client.post(CHAT, json=chat_body(stream=True), headers={"X-Request-Id": "s1"})
    assert streamed.headers["x-request-id"] == "s1"


def test_one_access_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="glmkit.access"):
        r = client.post(CHAT, json=chat_body(max_tokens=3, ignore_eos=True), headers={"X-Request-Id": "rid-1"})
        assert r.status_code == 200
        client.post(CHAT, json=chat_body(temperature=9), headers={"X-Request-Id": "rid 2"})
        client.get("/health")  # probes only at DEBUG
    lines = access_lines(caplog)
    assert len(lines) == 2, [r.getMessage() for r in lines]
    first, second = lines
    assert first.levelno == logging.INFO
    fields = first.access
    assert fields["method"] == "POST" and fields["route"] == CHAT and fields["status"] == 200
    assert fields["request_id"] == "rid-1" and fields["duration_ms"] >= 0
    usage = r.json()["usage"]
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == (usage["prompt_tokens"],
                                                                     usage["completion_tokens"])
    assert first.getMessage().startswith(f"method=POST route={CHAT} status=200 duration_ms=")
    assert "abort" not in fields
    assert second.access["status"] == 400 and 'request_id="rid 2"' in second.getMessage()
    assert "prompt_tokens" not in second.access


def test_no_access_log(tiny_dir, caplog):
    with TestClient(make_app(tiny_dir, access_log=False)) as c, caplog.at_level(logging.DEBUG, "glmkit.access"):
        c.get("/v1/models")
        c.get("/health")
    assert not access_lines(caplog)


def test_serve_flags():
    args = parse(["serve", "--open-docs", "--no-access-log", "--shutdown-timeout", "2.5",
                  "--engine-stall-timeout", "30"])
    assert args.open_docs and not args.access_log and args.shutdown_timeout == 2.5 and args.engine_stall_timeout == 30
    args = parse(["serve"])
    assert not args.open_docs and args.access_log and args.shutdown_timeout == 30
