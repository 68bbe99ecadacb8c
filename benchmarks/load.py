"""Load run: N concurrent streaming clients against a real `glmkit serve` for a fixed time.

    python benchmarks/load.py [--clients 64] [--seconds 60] [--max-tokens 32] [--model PATH]

Starts the server on 127.0.0.1 (default model), runs one warm-up request per client, then the clients for
the given time (requests in flight at the deadline run to their end), then prints: requests completed, errors,
streams that did not end with [DONE], output tokens/s, the server's RSS at start / middle / end (memory must
stay flat), and the KV blocks still in use after the run (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_fixtures import ServerProcess  # noqa: E402

QUESTIONS = ["What is a list comprehension?", "用一句话解释闭包。", "How do I sort a dict by value?",
             "什么是装饰器？", "Explain recursion briefly.", "写一个 Python 的 hello world。"]


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


async def client(url: str, model: str, number: int, deadline: float, max_tokens: int, stats: dict,
                 max_requests: int | None = None) -> None:
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as http:
        i = 0
        while (i < max_requests) if max_requests is not None else (time.monotonic() < deadline):
            body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": f"{QUESTIONS[(number + i) % len(QUESTIONS)]} ({number}.{i})"}]}
            i += 1
            start, first, done, tokens = time.monotonic(), None, False, 0
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        stats["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        payload = line[6:]
                        if payload == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            stats["errors"].append(chunk["error"]["message"])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.monotonic() - start
            except httpx.HTTPError as e:
                stats["errors"].append(f"{type(e).__name__}: {e}")
                continue
            stats["completed" if done else "no_done"] += 1
            stats["tokens"] += tokens
            if first is not None:
                stats["ttft"].append(first)


async def run(url: str, model: str, clients: int, seconds: float, max_tokens: int, pid: int) -> dict:
    # Warm-up: one request per client, so that the KV pool and the allocator reach their working size before
    # the memory baseline is taken.
    warm = {"completed": 0, "no_done": 0, "tokens": 0, "errors": [], "ttft": []}
    await asyncio.gather(*(client(url, model, n, 0.0, max_tokens, warm, max_requests=1) for n in range(clients)))
    stats = {"completed": 0, "no_done": 0, "tokens": 0, "errors": warm["errors"], "ttft": [], "rss": [rss_mb(pid)],
             "warmup_completed": warm["completed"]}
    deadline = time.monotonic() + seconds

    async def sample_memory():
        while time.monotonic() < deadline:
            await asyncio.sleep(seconds / 4)
            stats["rss"].append(rss_mb(pid))

    start = time.monotonic()
    await asyncio.gather(sample_memory(), *(client(url, model, n, deadline, max_tokens, stats) for n in range(clients)))
    stats["elapsed"] = time.monotonic() - start
    stats["rss"].append(rss_mb(pid))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    server_args = ["--embedding-model", "none", "--served-model-name", "bench", "--max-queue", "1024"]
    if args.model:
        server_args += ["--model", args.model]
    server = ServerProcess(*server_args)
    try:
        stats = asyncio.run(run(server.url, "bench", args.clients, args.seconds, args.max_tokens, server.proc.pid))
        time.sleep(1.0)
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    print(f"clients: {args.clients}  duration: {stats['elapsed']:.1f}s (after a warm-up round of "
          f"{stats['warmup_completed']} requests)  max_tokens: {args.max_tokens}")
    print(f"streams completed with [DONE]: {stats['completed']}  without [DONE]: {stats['no_done']}  "
          f"errors: {len(stats['errors'])}")
    print(f"output tokens: {stats['tokens']}  ({stats['tokens'] / stats['elapsed']:.1f} tok/s)")
    if stats["ttft"]:
        print(f"time to first token: median {statistics.median(stats['ttft']):.2f}s  max {max(stats['ttft']):.2f}s")
    print("server RSS MB after warm-up (start, during..., end): " + ", ".join(f"{m:.0f}" for m in stats["rss"]))
    print(f"KV blocks in use after the run: {metric(metrics, 'glmkit_kv_blocks_used'):.0f}; "
          f"requests running: {metric(metrics, 'glmkit_requests_running'):.0f}")
    for e in stats["errors"][:5]:
        print("error:", e)


if __name__ == "__main__":
    main()
