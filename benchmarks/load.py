"""Load run: N streaming clients, slow readers and an abort storm against a real `glmkit serve` for a fixed time.

    python benchmarks/load.py [--clients 64] [--seconds 60] [--max-tokens 32] [--slow-readers 2] [--abort-storm 20]
                              [--model PATH]

Starts the server on 127.0.0.1 (default model), runs one warm-up request per client, then for the given time:
- the well-behaved clients send streaming chat requests one after another (requests in flight at the deadline run
  to their end); a non-200, a stream without [DONE] or an error event is an error of theirs (must stay 0);
- K slow readers (--slow-readers 0: none) send streaming requests for 4x --max-tokens (ignore_eos) and read them
  256 bytes at a time, 1-2 s apart, through a 2 KiB socket receive buffer, so that their TCP window closes and
  the rest of the stream waits on the server's side; after the deadline they read their last response at full speed;
- an abort storm (--abort-storm 0: none) starts about R requests a second and drops each at a random point: right
  after sending, after a few chunks, after a random time, or a non-streamed request left before its answer.
It samples the server's RSS every few seconds, waits after the run until /metrics shows no request in flight and
no KV block in use, then prints what each group did, the well-behaved clients' time to first token, the RSS at
start / max / end with its slope over the second half of the run (memory must stay flat), and a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import struct
import sys
import time
from collections import Counter

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_fixtures import ServerProcess  # noqa: E402

QUESTIONS = ["What is a list comprehension?", "用一句话解释闭包。", "How do I sort a dict by value?",
             "什么是装饰器？", "Explain recursion briefly.", "写一个 Python 的 hello world。"]
DROPS = ("at once", "after chunks", "after a while", "non-streamed")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def chat_body(model: str, number: int, i: int, max_tokens: int, stream: bool = True) -> dict:
    body = {"model": model, "stream": stream, "max_tokens": max_tokens, "temperature": 0.7,
            "messages": [{"role": "user", "content": f"{QUESTIONS[(number + i) % len(QUESTIONS)]} ({number}.{i})"}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def raw_post(port: int, body: dict, rcvbuf: int = 0, reset: bool = False) -> socket.socket:
    """POST a chat request over a bare non-blocking socket and return the socket. rcvbuf shrinks the kernel's
    receive buffer (set before connecting, so the advertised window stays small); with reset, close sends an RST."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.setblocking(False)
    data = json.dumps(body).encode()
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                                      f"Connection: close\r\n\r\n".encode() + data)
    except OSError:
        sock.close()
        raise
    return sock


async def stream_once(http: httpx.AsyncClient, url: str, body: dict, stats: dict) -> str | None:
    """One streaming request of a well-behaved client; returns what went wrong, or None."""
    start, first, tokens, error = time.monotonic(), None, 0, None
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = error or f"error event: {chunk['error']['message']}"
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.monotonic() - start
            else:
                return error or "stream ended without [DONE]"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    if error is None:
        stats["completed"] += 1
        stats["tokens"] += tokens
        if first is not None:
            stats["ttft"].append(first)
    return error


async def client(url: str, model: str, number: int, deadline: float, max_tokens: int, stats: dict,
                 max_requests: int | None = None) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as http:
        i = 0
        while (i < max_requests) if max_requests is not None else (time.monotonic() < deadline):
            stats["requests"] += 1
            error = await stream_once(http, url, chat_body(model, number, i, max_tokens), stats)
            i += 1
            if error:
                stats["errors"].append(error)
                await asyncio.sleep(1.0)  # no hot loop against a failing server
    stats["end"] = max(stats["end"], time.monotonic())


async def slow_reader(port: int, model: str, number: int, deadline: float, max_tokens: int, stats: dict) -> None:
    loop, i = asyncio.get_running_loop(), 0
    while time.monotonic() < deadline:
        start, head, tail, error_event, failure = time.monotonic(), b"", b"", False, ""
        i += 1
        try:
            body = {**chat_body(model, number, i, max_tokens), "ignore_eos": True}
            with await raw_post(port, body, rcvbuf=2048) as sock:
                while chunk := await loop.sock_recv(sock, 256):
                    head = head or chunk
                    error_event = error_event or b'"error":' in tail + chunk
                    tail = (tail + chunk)[-64:]
                    if time.monotonic() < deadline:
                        await asyncio.sleep(random.uniform(1.0, 2.0))
        except OSError as e:
            failure = f"{type(e).__name__}: {e}"
        if head.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in tail and not error_event:
            stats["completed"] += 1
        else:
            stats["broken"] += 1
            stats["problems"].append(failure or f"{head[:12]!r}, error event: {error_event}, ends {tail[-40:]!r}")
            await asyncio.sleep(1.0)
        stats["longest"] = max(stats["longest"], time.monotonic() - start)


async def read_into(sock: socket.socket, received: bytearray, events: int | None) -> bool:
    """Read until `events` SSE events came (None: until the server closes); returns whether the server closed."""
    while events is None or received.count(b"data: ") < events:
        chunk = await asyncio.get_running_loop().sock_recv(sock, 4096)
        if not chunk:
            return True
        received += chunk
    return False


async def dropped_request(port: int, model: str, number: int, max_tokens: int, stats: Counter) -> None:
    drop = random.choice(DROPS)
    stats["started"] += 1
    stats[drop] += 1
    try:
        sock = await raw_post(port, chat_body(model, number, 0, max_tokens, stream=drop != "non-streamed"),
                              reset=random.random() < 0.5)
    except OSError:
        stats["connect failed"] += 1
        return
    received, answered = bytearray(), False
    try:
        if drop == "at once":
            await asyncio.sleep(random.uniform(0.0, 0.05))
        elif drop == "after chunks":
            answered = await asyncio.wait_for(read_into(sock, received, random.randint(1, 5)), 10.0)
        else:
            answered = await asyncio.wait_for(read_into(sock, received, None), random.uniform(0.2, 5.0))
    except TimeoutError:
        pass
    except OSError:
        stats["connection errors"] += 1
    finally:
        sock.close()
    status = received[9:12].decode()
    if status and status != "200":
        stats[f"HTTP {status}"] += 1
    stats["answered before the drop" if answered else "aborted"] += 1


async def abort_storm(port: int, model: str, rate: float, deadline: float, max_tokens: int, stats: Counter) -> None:
    tasks, number = set(), 10000  # prompts apart from the other clients' ones
    while time.monotonic() < deadline:
        task = asyncio.create_task(dropped_request(port, model, number, max_tokens, stats))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        number += 1
        await asyncio.sleep(random.expovariate(rate))
    await asyncio.gather(*tasks)


async def sample_memory(pid: int, start: float, deadline: float, samples: list) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(min(5.0, (deadline - start) / 20))
        samples.append((time.monotonic() - start, rss_mb(pid)))


async def run(args, url: str, port: int, pid: int) -> tuple[dict, dict, Counter, list]:
    # Warm-up: one request per client, so that the KV pool and the allocator reach their working size before
    # the memory baseline is taken.
    good = {"requests": 0, "completed": 0, "tokens": 0, "errors": [], "ttft": [], "end": 0.0}
    await asyncio.gather(*(client(url, "bench", n, 0.0, args.max_tokens, good, max_requests=1)
                           for n in range(args.clients)))
    good.update(warmup=good["completed"], tokens=0, ttft=[])  # its requests and errors stay counted
    slow = {"completed": 0, "broken": 0, "longest": 0.0, "problems": []}
    storm, samples = Counter(), [(0.0, rss_mb(pid))]
    start = time.monotonic()
    deadline = start + args.seconds
    work = [sample_memory(pid, start, deadline, samples)]
    work += [client(url, "bench", n, deadline, args.max_tokens, good) for n in range(args.clients)]
    work += [slow_reader(port, "bench", 1000 + n, deadline, 4 * args.max_tokens, slow)
             for n in range(args.slow_readers)]
    if args.abort_storm > 0:
        work.append(abort_storm(port, "bench", args.abort_storm, deadline, args.max_tokens, storm))
    await asyncio.gather(*work)
    good["elapsed"] = good["end"] - start
    return good, slow, storm, samples


def settle(url: str, timeout: float = 120.0) -> tuple[dict, float]:
    """Poll /metrics until no request is in flight, running or waiting and no KV block is in use (or timeout)."""
    start = time.monotonic()
    while True:
        text = httpx.get(url + "/metrics", timeout=30).text
        values = {name: metric(text, "glmkit_" + name) for name in
                  ("http_requests_in_flight", "requests_running", "requests_waiting", "kv_blocks_used")}
        if all(v == 0 for v in values.values()) or time.monotonic() - start > timeout:
            return values, time.monotonic() - start
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slow-readers", type=int, default=2, help="slow-reading streaming clients (0: none)")
    parser.add_argument("--abort-storm", type=float, default=20.0, help="dropped requests a second (0: none)")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    server_args = ["--embedding-model", "none", "--served-model-name", "bench", "--max-queue", "1024"]
    if args.model:
        server_args += ["--model", args.model]
    server = ServerProcess(*server_args)
    try:
        good, slow, storm, samples = asyncio.run(run(args, server.url, server.port, server.proc.pid))
        after, waited = settle(server.url)
        end_rss = rss_mb(server.proc.pid)
    finally:
        server.stop()
    rss = [m for _, m in samples] + [end_rss]
    half = [(t, m) for t, m in samples if t >= args.seconds / 2]
    slope = (statistics.linear_regression([t for t, _ in half], [m for _, m in half]).slope * 60
             if len(half) >= 2 else float("nan"))
    p50, p99 = percentile(good["ttft"], 0.5), percentile(good["ttft"], 0.99)
    tok_s = good["tokens"] / good["elapsed"]
    storm_text = ", ".join(f"{k} {storm[k]}" for k in DROPS) + "); " + ", ".join(
        f"{k} {v}" for k, v in storm.items() if k not in DROPS and k != "started")
    print(f"well-behaved clients: {args.clients} for {good['elapsed']:.1f}s (after a warm-up round of "
          f"{good['warmup']} requests)  max_tokens: {args.max_tokens}")
    print(f"errors (well-behaved): {len(good['errors'])}  (requests: {good['requests']}, completed with [DONE]: "
          f"{good['completed']}; warm-up included)")
    print(f"output tokens: {good['tokens']}  ({tok_s:.1f} tok/s)  time to first token: p50 {p50:.2f}s  "
          f"p99 {p99:.2f}s  max {max(good['ttft'], default=float('nan')):.2f}s")
    print(f"slow readers: {args.slow_readers}  requests completed: {slow['completed']}  broken: {slow['broken']}  "
          f"longest request: {slow['longest']:.0f}s")
    print(f"abort storm: {args.abort_storm:g}/s  started: {storm['started']} (to drop {storm_text}"
          if args.abort_storm > 0 else "abort storm: off")
    print(f"server RSS MB: start {rss[0]:.0f}  max {max(rss):.0f}  end {end_rss:.0f} (after the drain)  "
          f"slope over the second half {slope:+.2f} MB/min")
    print("  samples (s: MB): " + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in samples))
    print(f"after the run ({'settled' if all(v == 0 for v in after.values()) else 'NOT settled'} in {waited:.1f}s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in after.items()))
    for e in good["errors"][:5]:
        print("error (well-behaved):", e)
    for e in slow["problems"][:3]:
        print("slow reader:", e)
    print(f"load: {args.clients} streams + {args.slow_readers} slow readers + abort storm {args.abort_storm:g}/s "
          f"for {args.seconds:g} s: well-behaved {len(good['errors'])} errors / {good['requests']} requests, "
          f"{tok_s:.1f} tok/s, TTFT p50 {p50:.2f} s p99 {p99:.2f} s; slow readers {slow['completed']} completed / "
          f"{slow['broken']} broken; storm {storm['started']} started / {storm['aborted']} aborted; RSS start "
          f"{rss[0]:.0f} MB max {max(rss):.0f} MB end {end_rss:.0f} MB slope {slope:+.2f} MB/min; after: KV blocks "
          f"{after['kv_blocks_used']:.0f}, requests in flight {after['http_requests_in_flight']:.0f}")


if __name__ == "__main__":
    main()
