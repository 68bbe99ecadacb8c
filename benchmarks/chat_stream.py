"""Streaming display cost per delta: the old way (decode all ids so far at every delta, then `startswith` over
the whole text, as the chat route and LLM.stream_chat did) against ChatStream.feed (chat/serving.py).

    python benchmarks/chat_stream.py [--tokens 4000] [--window 500] [--route]

Builds a plain answer of N tokens (Chinese, English, rare characters that fall back to bytes, ChatGLM's
[[训练时间]] marker, blank lines) with the tiny tokenizers the tests train offline (tests/tokenizer_fixtures.py),
for ChatGLM3 (SentencePiece), GLM-4 (tiktoken) and a Qwen-style tokenizer.json (jinja), and feeds it one
token per delta. Prints the mean time per delta over the first and the last `window` deltas for both ways, and
the ratio last/first: about 1 means the cost of a delta does not grow with the answer (linear streaming). Both
ways must show the same text (checked). The old way is reproduced here verbatim (it no longer exists in the
package) so the comparison stays runnable.

With --route it also streams the jinja answer through the real OpenAI chat route: a `glmkit serve` app on a
tiny random Qwen-style checkpoint, run by uvicorn on 127.0.0.1, whose engine client is replaced by one that
yields the answer's ids one per delta at once (so the time between two SSE chunks is the route's own work
per delta: the chat layer, the JSON chunk, the HTTP write), read by httpx as a streaming client.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tokenizer_fixtures import train_sentencepiece, write_glm4_ranks, write_hf_tokenizer  # noqa: E402

from glmkit.chat import ChatPrompt, ChatServing, get_chat_format  # noqa: E402
from glmkit.chat.tool_calls import TOOL_CALL_CLOSE, TOOL_CALL_OPEN  # noqa: E402

PARAGRAPH = ("你好，我是人工智能助手。我的知识截止到[[训练时间]]。龘靐齉 The quick brown fox jumps over the lazy dog. "
             "12345\n\n```python\nprint('hello world')\n```\n  晚上睡不着应该怎么办？ ok 😀 ")


# --- the old display (before chat/serving.py): the whole output decoded at every delta -------------------

def old_withhold_partial(text: str, markers: tuple[str, ...] = ()) -> str:
    text = text.rstrip("\ufffd")
    for marker in markers:
        for k in range(len(marker) - 1, 0, -1):
            if text.endswith(marker[:k]):
                return text[:-k]
    return text


def hide_hermes_blocks(text: str) -> str:
    kept, pos = [], 0
    while True:
        start = text.find(TOOL_CALL_OPEN, pos)
        if start < 0:
            kept.append(text[pos:])
            return "".join(kept)
        kept.append(text[pos:start])
        end = text.find(TOOL_CALL_CLOSE, start)
        if end < 0:
            return "".join(kept)
        pos = end + len(TOOL_CALL_CLOSE)


def old_display_text(f, output_ids: list[int]) -> str:
    """The formats' non-final display_text as it was: plain, segmented (ChatGLM3/GLM-4) or jinja."""
    markers = tuple(old for old, _ in f.replacements)
    if f.name == "jinja":
        return hide_hermes_blocks(old_withhold_partial(f.tokenizer.decode(output_ids), (TOOL_CALL_OPEN,))).strip()
    if f.segment_token is None:
        return f.postprocess(old_withhold_partial(f.tokenizer.decode(output_ids), markers))
    texts, segments = [], f._split(output_ids)  # noqa: SLF001 - the old code's own helper
    for n, segment in enumerate(segments):
        metadata, sep, body = segment.partition("\n")
        if not sep:
            break
        if metadata.strip():
            continue
        if n == len(segments) - 1:
            body = old_withhold_partial(body, markers)
        texts.append(f.postprocess(body))
    return "\n".join(t for t in texts if t)


def time_old(f, ids: list[int]) -> tuple[list[float], str]:
    shown, deltas, times = "", [], []
    for k in range(1, len(ids) + 1):
        t0 = time.perf_counter()
        display = old_display_text(f, ids[:k])
        deltas.append(display[len(shown):] if display.startswith(shown) else "")
        shown = display if display.startswith(shown) else shown
        times.append(time.perf_counter() - t0)
    return times, "".join(deltas)


def time_new(f, ids: list[int]) -> tuple[list[float], str]:
    stream, deltas, times = ChatServing(f).stream(ChatPrompt([])), [], []
    for token_id in ids:
        t0 = time.perf_counter()
        deltas.append(stream.feed([token_id]))
        times.append(time.perf_counter() - t0)
    return times, "".join(deltas)


# --- setup and report ----------------------------------------------------------------------------------------

def tokenizers(workdir: Path) -> dict:
    from glmkit.tokenizers.chatglm_sp import ChatGLMSPTokenizer
    from glmkit.tokenizers.glm4 import GLM4Tokenizer
    from glmkit.tokenizers.hf import HFTokenizer

    for name in ("sp", "g4", "hf"):
        (workdir / name).mkdir()
    write_hf_tokenizer(workdir / "hf")
    config = json.loads((workdir / "hf" / "tokenizer_config.json").read_text())
    return {"chatglm3": ChatGLMSPTokenizer(train_sentencepiece(workdir / "sp")),
            "glm4": GLM4Tokenizer(write_glm4_ranks(workdir / "g4")),
            "jinja": HFTokenizer(workdir / "hf" / "tokenizer.json", config)}


def answer_ids(f, num_tokens: int) -> list[int]:
    """A plain answer as the model writes it: for ChatGLM3/GLM-4 an empty metadata line first."""
    head = f.tokenizer.encode("\n") if f.segment_token else []
    text = PARAGRAPH
    while len(head + f.tokenizer.encode(text)) < num_tokens:
        text += PARAGRAPH
    return (head + f.tokenizer.encode(text))[:num_tokens]


def time_route(workdir: Path, tokenizer, ids: list[int]) -> list[float]:
    """Seconds between consecutive content chunks of one streamed chat answer through the real route."""
    import asyncio
    import socket
    import threading

    import httpx
    import uvicorn
    from checkpoint_fixtures import llama_config, make_hf_dir, random_llama_state

    from glmkit.engine.outputs import Delta
    from glmkit.server.app import create_app
    from glmkit.server.state import ServerSettings

    config = llama_config(tokenizer.vocab_size)
    model_dir = make_hf_dir(workdir / "qwen", random_llama_state(config), config, workdir / "hf")
    app = create_app(ServerSettings(model=str(model_dir), embedding_model=None, served_model_names=["tiny"],
                                    engine_kwargs=dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.02)),
                     load_in_background=False)

    async def generate(prompt_ids, params, request_id=None):
        for i, token in enumerate(ids):
            await asyncio.sleep(0)
            yield Delta(request_id or "bench", 0, "", [token], "length" if i == len(ids) - 1 else None,
                        num_prompt_tokens=len(prompt_ids), num_output_tokens=i + 1)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        while not server.started:
            time.sleep(0.05)
        app.state.glmkit.client.generate = generate
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        arrivals = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][:1] and \
                        json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    arrivals.append(time.perf_counter())
        return [b - a for a, b in zip(arrivals, arrivals[1:])]
    finally:
        server.should_exit = True
        thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--route", action="store_true", help="also time the real chat route (SSE over HTTP)")
    args = parser.parse_args()
    w = args.window
    us = lambda xs: statistics.fmean(xs) * 1e6  # noqa: E731
    print(f"{args.tokens}-token plain answer, one token per delta; mean us per delta over the first / last {w}")
    print(f"{'format':10} {'old first':>10} {'old last':>10} {'old ratio':>10} {'new first':>10} {'new last':>10} "
          f"{'new ratio':>10} {'last: old/new':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, tokenizer in tokenizers(Path(tmp)).items():
            f = get_chat_format(name, tokenizer=tokenizer, model_type="benchmark")
            ids = answer_ids(f, args.tokens)
            (old, old_text), (new, new_text) = time_old(f, ids), time_new(f, ids)
            assert new_text == old_text, "the two ways must show the same text"
            o1, o2, n1, n2 = us(old[:w]), us(old[-w:]), us(new[:w]), us(new[-w:])
            print(f"{name:10} {o1:10.1f} {o2:10.1f} {o2 / o1:10.2f} {n1:10.1f} {n2:10.1f} {n2 / n1:10.2f} "
                  f"{o2 / n2:14.1f}")
            if name == "jinja":
                route_tokenizer, route_ids = tokenizer, ids
        if args.route:
            gaps = time_route(Path(tmp), route_tokenizer, route_ids)
            print(f"chat route, SSE over HTTP ({len(gaps) + 1} content chunks): mean us between chunks, first "
                  f"{us(gaps[:w]):.1f}, last {us(gaps[-w:]):.1f}, ratio {us(gaps[-w:]) / us(gaps[:w]):.2f}")


if __name__ == "__main__":
    main()
