"""Web page load check: N clients chatting through the page's own endpoints at once, against N concurrent
requests to the API alone, on the same `glmkit serve` (default model unless --model), in the same run.

    python benchmarks/web_load.py [--clients 16] [--max-tokens 64] [--repeats 3] [--model PATH]

The page's clients are gradio_client sessions calling its `/send` endpoint (what the browser's Send does:
Gradio's queue, the agent loop, the conversation store, then the API over the loopback); the API clients
stream /v1/chat/completions directly. Both ask the same questions at temperature 0 with the same max_tokens,
so the engine does the same work. Each repeat runs the API round, then the page round; it prints each round's
wall time (all N answered), the median of each and their ratio (page / API): the page must not serialise its
users, so the ratio should stay near 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from server_fixtures import ServerProcess  # noqa: E402

QUESTIONS = ["What is a list comprehension?", "用一句话解释闭包。", "How do I sort a dict by value?",
             "什么是装饰器？", "Explain recursion briefly.", "写一个 Python 的 hello world。",
             "What does `yield` do?", "列表和元组有什么区别？"]


def api_round(url: str, clients: int, max_tokens: int) -> tuple[float, int]:
    def one(i: int) -> int:
        body = {"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        text = ""
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += line
        return int(bool(text))

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        answered = sum(pool.map(one, range(clients)))
    return time.monotonic() - start, answered


def page_round(url: str, clients: int, max_tokens: int) -> tuple[float, int]:
    from gradio_client import Client

    sessions = [Client(url + "/ui/", verbose=False) for _ in range(clients)]  # connected before the clock starts

    def one(i: int) -> int:
        # /send's inputs: text, model, mode, system, max_tokens, temperature, top_p, and the character fields
        chat, *_ = sessions[i].predict(QUESTIONS[i % len(QUESTIONS)], "bench", "chat", "", max_tokens, 0.0, 1.0,
                                       "", "", "", "", "", api_name="/send")
        return int(len(chat) == 2 and bool(chat[-1]["content"]))

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        answered = sum(pool.map(one, range(clients)))
    return time.monotonic() - start, answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    server_args = ["--embedding-model", "none", "--served-model-name", "bench", "--max-queue", "1024"]
    if args.model:
        server_args += ["--model", args.model]
    home = tempfile.mkdtemp(prefix="glmkit-web-load-")
    server = ServerProcess(*server_args, ui=True, env={"GLMKIT_HOME": home})
    api, page = [], []
    try:
        api_round(server.url, args.clients, args.max_tokens)  # warm-up: first-request costs out of the figures
        for repeat in range(args.repeats):
            seconds, answered = api_round(server.url, args.clients, args.max_tokens)
            api.append(seconds)
            print(f"repeat {repeat + 1}: API  {args.clients} concurrent: {seconds:.2f} s ({answered} answered)")
            seconds, answered = page_round(server.url, args.clients, args.max_tokens)
            page.append(seconds)
            print(f"repeat {repeat + 1}: page {args.clients} clients:    {seconds:.2f} s ({answered} answered)")
    finally:
        server.stop()
    a, p = statistics.median(api), statistics.median(page)
    print(f"web load: {args.clients} clients, max_tokens {args.max_tokens}: API alone median {a:.2f} s, through "
          f"the page median {p:.2f} s, ratio page/API {p / a:.2f}")


if __name__ == "__main__":
    main()
