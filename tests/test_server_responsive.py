"""Responsiveness under hostile requests, on a real `glmkit serve` with the tiny random ChatGLM3 checkpoint: while
one client sends a 10 MB body and another a request with 1,000 tools (or 128 heavy ones), GET /health and a
running chat stream keep answering within 200 ms per event.

Each measurement takes a baseline on the same server first (the streams and a /health poller alone, 2 s), then
the same figures while the attackers run, and prints both (`pytest -s` shows them). The bound per event, in both
phases, is max(200 ms, 3 x the baseline's p95). 200 ms is the issue's figure. The baseline term only matters on
a machine so loaded that the quiet server itself comes near 200 ms (this one has two cores shared with other test
runs): there the OS scheduler and the GIL hand-off between the event loop and the engine thread stretch every
event, and 200 ms alone would test the machine rather than the server. p95, not the maximum, so that a stall in
the quiet phase cannot raise the bound: it misses the bound itself (a server that stalls without attackers does
not keep answering either). A stall caused by an attacker (work on the event loop, a worker thread holding the
GIL, a collection of the whole heap) is one gap as long as the stall: the bound catches it.

A measurement that misses the bound is taken once more, on the same server, with fresh attackers, and the test
fails only when both miss it. A stall the attack causes comes back every time; on this machine (CPU pressure
above 90% from other jobs) the whole server process is now and then not scheduled for 200-400 ms, which no
thread of it can see or avoid, and that rarely strikes twice in a row. (A pause that comes on its own every so
often, like a collection of the whole heap, is caught only when it falls into a measurement.)

`test_default_limits_*`: the limits refuse the attackers early: 413 from the Content-Length, 413 once 8 MiB of a
chunked body (no Content-Length) have arrived, 400 naming `tools` for 1,000 tools.
`test_raised_limits_*`: the heavy work really happens: with --max-body-size 64M and a 256K-token context a 10 MB
message passes the cheap size check and is tokenized, and 128 tools with 35 KB descriptions each are rendered
and tokenized; both are then refused as longer than the context (400 context_length_exceeded).

The attackers run in processes of their own: as threads of the test they would share its GIL with the poller
and the stream reader, and their pauses would be counted as the server's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_api_support import CHAT, assert_openai_error
from server_fixtures import ServerProcess

# One torch thread: the test's own threads share the machine's cores (as in test_server_lifecycle.py).
SERVE_ARGS = ("--served-model-name", "tiny", "--embedding-model", "none", "--dtype", "float32", "--threads", "1")
BOUND_S = 0.200          # the per-event bound
BASELINE_FACTOR = 3      # ... or this many times the quiet server's p95, whichever is larger (module docstring)
BASELINE_S = 2.0         # how long the baseline is measured
HEALTH_PERIOD_S = 0.020  # /health is polled this often
ATTEMPTS = 2             # measurements before a miss of the bound fails the test (module docstring)
MB = 1_000_000
BIG_MESSAGE = "今天天气怎么样？北京晴，气温 22 度。" * (10 * MB // 50)  # 10.4 MB of UTF-8, 4M tokens


# --- measuring -------------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def figures(values: list[float]) -> str:
    return f"n={len(values)} max={max(values, default=0) * 1000:.1f}ms p99={pct(values, 0.99) * 1000:.1f}ms " \
           f"p90={pct(values, 0.9) * 1000:.1f}ms p50={pct(values, 0.5) * 1000:.1f}ms"


class HealthPoller(threading.Thread):
    """GET /health every HEALTH_PERIOD_S on one kept-alive connection; `samples` are (sent, latency, status)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.samples, self.failure = url, [], None
        self.stopping = threading.Event()
        self.start()

    def run(self):
        try:
            with httpx.Client(timeout=30) as c:
                while not self.stopping.is_set():
                    sent = time.perf_counter()
                    status = c.get(self.url + "/health").status_code
                    latency = time.perf_counter() - sent
                    self.samples.append((sent, latency, status))
                    time.sleep(max(0.0, HEALTH_PERIOD_S - latency))
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.failure = e

    def stop(self):
        self.stopping.set()
        self.join(30)
        assert not self.is_alive() and self.failure is None, self.failure
        assert all(status == 200 for _, _, status in self.samples), [s for s in self.samples if s[2] != 200][:5]

    def latencies(self, start: float, end: float) -> list[float]:
        return [latency for sent, latency, _ in self.samples if start <= sent < end]


# The random model ends a chat answer with a role token within a few hundred tokens (ignore_eos does not cover
# those); an answer held to one long JSON string cannot end early, so the stream runs to max_tokens.
ENDLESS = {"type": "json_schema", "json_schema": {"name": "endless", "schema": {"type": "string",
                                                                                 "minLength": 1_000_000}}}


class ChatStreams(threading.Thread):
    """Streamed chat answers of exactly `tokens` tokens each (greedy, held to ENDLESS), one after the other on one
    connection until stop(), so that a stream is running whatever the machine's speed; `times` are the arrival
    times of all their SSE events. logprobs make every engine step an event, whatever the (gibberish) text holds
    back. Between two answers the gap is the next request's way through the server to its first event."""

    def __init__(self, url: str, tokens: int = 300, repeat: bool = True):
        super().__init__(daemon=True)
        self.url, self.tokens, self.repeat = url, tokens, repeat
        self.times: list[float] = []
        self.answers: list[list[str]] = []  # the SSE lines of each answer
        self.failure = None
        self.first_event, self.stopping = threading.Event(), threading.Event()
        self.start()

    def run(self):
        body = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": self.tokens,
                "temperature": 0, "ignore_eos": True, "logprobs": True, "response_format": ENDLESS, "stream": True}
        try:
            with httpx.Client(timeout=60) as c:
                while True:
                    lines = []
                    self.answers.append(lines)
                    with c.stream("POST", self.url + CHAT, json=body) as r:
                        assert r.status_code == 200, (r.status_code, r.read())
                        for line in r.iter_lines():
                            if line:
                                self.times.append(time.perf_counter())
                                lines.append(line)
                                self.first_event.set()
                    if not self.repeat or self.stopping.is_set():
                        return
        except Exception as e:  # noqa: BLE001 - reported by stop()
            self.failure = e
        finally:
            self.first_event.set()

    def gaps(self, start: float, end: float) -> list[float]:
        """Gaps between consecutive events that end within [start, end)."""
        return [b - a for a, b in zip(self.times, self.times[1:]) if start <= b < end]

    def stop(self, timeout_s: float = 60):
        """Lets the running answer finish; each answer ended normally: all its tokens, then [DONE]."""
        self.stopping.set()
        self.join(timeout_s)
        assert not self.is_alive(), f"a stream is still running after {timeout_s}s"
        assert self.failure is None, repr(self.failure)
        for lines in self.answers:
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert not any('"error"' in line for line in lines), [line for line in lines if '"error"' in line][:1]
            last = json.loads(lines[-2].removeprefix("data: "))
            assert last["choices"][0]["finish_reason"] == "length", last


ATTACKER = r"""
import json, sys, time
import httpx

base, path, chunked, times = json.loads(sys.argv[1])
body = open(path, "rb").read()


def content():
    if not chunked:
        return body  # sent with its Content-Length
    view = memoryview(body)  # a generator: chunked transfer encoding, no Content-Length
    return (bytes(view[i:i + 256 * 1024]) for i in range(0, len(body), 256 * 1024))


with httpx.Client(timeout=60) as c:
    c.get(base + "/health")  # imports and the first connection before the start signal
print("ready", flush=True)
sys.stdin.readline()
for _ in range(times):
    sent = time.perf_counter()
    with httpx.Client(timeout=60) as c:
        r = c.post(base + "/v1/chat/completions", content=content(), headers={"Content-Type": "application/json"})
    print(json.dumps([time.perf_counter() - sent, r.status_code, r.headers.get("content-type"), r.text]), flush=True)
"""


class Attacker:
    """A process that POSTs the body in `path` to /v1/chat/completions `times` times, one after the other, once
    `go()` is called; `results` are (seconds to the answer, the response)."""

    def __init__(self, name: str, url: str, path, times: int, chunked: bool = False):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-c", ATTACKER, json.dumps([url, str(path), chunked, times])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.results: list[tuple[float, httpx.Response]] = []
        assert self.proc.stdout.readline() == "ready\n", f"{name} did not start"

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait(self, timeout_s: float = 120):
        out, _ = self.proc.communicate(timeout=timeout_s)
        assert self.proc.returncode == 0, f"{self.name} failed"
        for line in out.splitlines():
            seconds, status, content_type, text = json.loads(line)
            self.results.append((seconds, httpx.Response(status, headers={"content-type": content_type},
                                                         text=text)))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def cpu_pressure() -> float | None:
    """Seconds that runnable tasks of this machine have waited for a CPU (Linux PSI "some" total), if known."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def under_attack(server: ServerProcess, specs: list[tuple]) -> tuple[dict, list[Attacker]]:
    """A baseline, then attackers (Attacker's arguments after the URL) all at once, with streams running
    throughout. -> (the measured figures, the attackers with their answers)."""
    attackers = []
    try:
        for name, path, times, *chunked in specs:
            attackers.append(Attacker(name, server.url, path, times, *chunked))
        for _ in range(2):  # the first requests of a process are slow (lazy set-up): not part of the baseline
            ChatStreams(server.url, 100, repeat=False).stop()
        poller, streams = HealthPoller(server.url), ChatStreams(server.url)
        try:
            assert streams.first_event.wait(60) and streams.failure is None, streams.failure
            time.sleep(0.3)
            base_start, base_pressure = time.perf_counter(), cpu_pressure()
            time.sleep(BASELINE_S)
            attack_start, attack_pressure = time.perf_counter(), cpu_pressure()
            for a in attackers:
                a.go()
            for a in attackers:
                a.wait()
            attack_end, end_pressure = time.perf_counter(), cpu_pressure()
            time.sleep(0.2)  # what the server could not send during a stall at the very end arrives now
            window_end = time.perf_counter()
        finally:
            poller.stopping.set()
            streams.stopping.set()
        poller.stop()
        streams.stop()
    finally:
        for a in attackers:
            a.kill()
    out = {"health_base": poller.latencies(base_start, attack_start),
           "health_attack": poller.latencies(attack_start, window_end),
           "gaps_base": streams.gaps(base_start, attack_start),
           "gaps_attack": streams.gaps(attack_start, window_end)}
    print(f"\n  the attack took {attack_end - attack_start:.2f}s; {len(streams.answers)} streamed answers of "
          f"{streams.tokens} tokens")
    if base_pressure is not None:
        print(f"  CPU pressure (share of the time some task waited for a CPU): baseline "
              f"{(attack_pressure - base_pressure) / (attack_start - base_start):.0%}, under attack "
              f"{(end_pressure - attack_pressure) / (attack_end - attack_start):.0%}")
    for a in attackers:
        print(f"  {a.name}: answered in " + ", ".join(f"{t * 1000:.0f}ms ({r.status_code})" for t, r in a.results))
    for key, what in (("health", "/health latency"), ("gaps", "stream gaps")):
        print(f"  {what:15s} baseline:     {figures(out[key + '_base'])}")
        print(f"  {what:15s} under attack: {figures(out[key + '_attack'])}")
    return out, attackers


def stalls(out: dict) -> list[str]:
    """What missed the bound (module docstring), under attack or in the quiet phase before it."""
    assert len(out["health_base"]) > 20 and len(out["gaps_base"]) > 20, out
    assert len(out["health_attack"]) > 5 and len(out["gaps_attack"]) > 5, out
    missed = []
    for key, what in (("health", "/health latency"), ("gaps", "gap between stream events")):
        bound = max(BOUND_S, BASELINE_FACTOR * pct(out[key + "_base"], 0.95))
        for phase, when in (("_attack", "under attack"), ("_base", "on the quiet server")):
            worst = max(out[key + phase])
            if worst >= bound:
                missed.append(f"{what}: {worst * 1000:.0f} ms {when}, bound {bound * 1000:.0f} ms (baseline "
                              f"{figures(out[key + '_base'])}; under attack {figures(out[key + '_attack'])})")
    return missed


def assert_responsive(server: ServerProcess, specs: list[tuple], check_answers) -> None:
    """Measures under attack (again if a measurement misses the bound, up to ATTEMPTS: module docstring);
    `check_answers(attackers)` checks what the attackers were answered, each time."""
    missed = []
    for attempt in range(1, ATTEMPTS + 1):
        out, attackers = under_attack(server, specs)
        check_answers(attackers)
        missed = stalls(out)
        if not missed:
            return
        print(f"  attempt {attempt} missed the bound: " + "; ".join(missed))
    pytest.fail(f"{ATTEMPTS} times, last: " + "; ".join(missed))


def chat_bytes(content: str, **extra) -> bytes:
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
                       **extra}, ensure_ascii=False).encode()


def tools(count: int, description: str = "Get the current weather in a city") -> list[dict]:
    return [{"type": "function", "function": {
        "name": f"tool_{i}", "description": description,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}} for i in range(count)]


# --- default limits: the attackers are refused early -----------------------------------------------------------

@pytest.fixture(scope="module")
def default_server(tiny_dir):
    server = ServerProcess("--model", str(tiny_dir), *SERVE_ARGS, "--kv-cache-memory", "0.02",
                           "--max-model-len", "8192")
    try:
        yield server
    finally:
        server.stop()


def test_default_limits_health_and_stream_stay_responsive(default_server, tmp_path):
    big, many_tools = tmp_path / "big.json", tmp_path / "tools.json"
    big.write_bytes(chat_bytes(BIG_MESSAGE))
    many_tools.write_bytes(chat_bytes("hi", tools=tools(1000)))
    size = big.stat().st_size
    assert size > 10 * MB
    specs = [("10 MB, Content-Length", big, 4), ("10 MB, chunked", big, 4, True), ("1,000 tools", many_tools, 4)]

    def check_answers(attackers):
        with_length, chunked, many = (a.results for a in attackers)
        assert len(with_length) == len(chunked) == len(many) == 4
        # 413 from the Content-Length, before any of the body is read; chunked: once more than 8 MiB arrived.
        for seconds, r in with_length:
            assert_openai_error(r, 413, code="request_too_large",
                                contains=(f"the request body has {size} bytes", "--max-body-size"))
            assert seconds < 5, seconds
        for seconds, r in chunked:
            assert_openai_error(r, 413, code="request_too_large",
                                contains=(f"the request body has more than {8 << 20} bytes", "--max-body-size"))
            assert seconds < 5, seconds
        for seconds, r in many:
            assert_openai_error(r, 400, param="tools", contains=("tools", "128"))
            assert seconds < 5, seconds

    assert_responsive(default_server, specs, check_answers)


# --- raised limits: the heavy work happens ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def raised_server(tiny_dir):
    # A 256K-token context (128 MiB of KV cache for the tiny model), so the cheap size check lets a 10 MB message
    # through: a token of this tokenizer spells at most 15 bytes, times the normalization slack of 4, so 10.4 MB
    # are at least ~173K tokens, which fit; tokenized they are 4M.
    server = ServerProcess("--model", str(tiny_dir), *SERVE_ARGS, "--kv-cache-memory", "0.15",
                           "--max-model-len", "262144", "--max-body-size", "64M")
    try:
        yield server
    finally:
        server.stop()


def test_raised_limits_health_and_stream_stay_responsive(raised_server, tmp_path):
    big, heavy_tools = tmp_path / "big.json", tmp_path / "tools.json"
    big.write_bytes(chat_bytes(BIG_MESSAGE))
    description = "Get the current weather in a city. " * 700  # 24.5 KB each, 3.1 MB in all: 2.5M tokens
    heavy_tools.write_bytes(chat_bytes("hi", tools=tools(128, description), tool_choice="required"))
    specs = [("10 MB message", big, 1), ("128 heavy tools", heavy_tools, 1)]

    def check_answers(attackers):
        # Both pass the bound (a token spells at most ~60 bytes here) and are refused either by the estimate
        # from tokenized samples ("about N tokens") or, tokenized whole, with their exact counts ("prompt has N").
        for a, tokens in zip(attackers, (4_000_000, 2_000_000)):
            assert len(a.results) == 1
            for seconds, r in a.results:
                err = assert_openai_error(r, 400, param="messages", code="context_length_exceeded",
                                          contains=("the model accepts 262144",))
                message = err["message"]
                if "estimated" in message:  # refused at more than twice the context
                    assert int(message.split("about ")[1].split()[0]) > 2 * 262144, err
                else:
                    assert int(message.split("prompt has ")[1].split()[0]) > tokens, err
                print(f"  {a.name}: {message[:110]}")

    assert_responsive(raised_server, specs, check_answers)
