"""Server API: golden SSE transcripts, streamed tool calls, /v1/completions and the legacy ChatGLM POST /."""

import asyncio
import copy
import json
from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from checkpoint_fixtures import llama_config, make_hf_dir, random_llama_state
from glmkit.engine.outputs import Delta
from server_api_support import (
    CHAT, COMPLETIONS, FIXED_CALL, GOLDEN_DIR, LEGACY, UPDATE_GOLDEN, WEATHER, assert_openai_error, chat_body,
    fix_tool_calls,
    is_content_chunk, make_app, parse_sse, state_of,
)


# --- 5. golden SSE transcripts --------------------------------------------------------------------------------

def normalize_chat_stream(events: list) -> list:
    """Volatile fields -> placeholders: id, created, call ids, the random model's text and the prompt size.
    Consecutive content chunks (how the gibberish splits into deltas) collapse into one."""
    chunks = [e for e in events if isinstance(e, dict)]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    out = []
    for event in events:
        if not isinstance(event, dict):
            out.append(event)
            continue
        e = copy.deepcopy(event)
        e["id"], e["created"] = "<id>", "<created>"
        for choice in e["choices"]:
            delta = choice["delta"]
            if delta.get("content"):
                delta["content"] = "<text>"
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    call["id"] = "<call_id>"
        if "usage" in e:
            e["usage"]["prompt_tokens"] = e["usage"]["total_tokens"] = "<n>"
        if is_content_chunk(e) and out and out[-1] == e:
            continue
        out.append(e)
    return out


def check_golden(name: str, events: list) -> None:
    path = GOLDEN_DIR / f"{name}.jsonl"
    lines = [json.dumps(e, ensure_ascii=False, sort_keys=True) for e in normalize_chat_stream(events)]
    if UPDATE_GOLDEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert path.exists(), f"{path} is missing; run with GLMKIT_UPDATE_GOLDEN=1 to write it"
    expected = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [json.loads(x) for x in expected], "\n".join(lines)


def check_chat_stream_structure(events: list, finish_reason: str, usage: bool, n: int = 1) -> None:
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["model"] == "tiny"
    if usage:
        last = chunks.pop()
        assert last["choices"] == [], last
        u = last["usage"]
        assert u["prompt_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert all("usage" not in c for c in chunks)
    for index in range(n):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert all(len(c["choices"]) == 1 for c in chunks)
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[0]["finish_reason"] is None
        assert all("role" not in c["delta"] for c in mine[1:])
        assert [c["finish_reason"] for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] == finish_reason and mine[-1]["delta"] == {}


@pytest.fixture
def deterministic_length(app, monkeypatch):
    """Greedy decoding that runs exactly to max_tokens: no chat stop tokens, no EOS."""
    monkeypatch.setattr(state_of(app).llm.chat_format, "stop_token_ids", [])
    return dict(temperature=0, ignore_eos=True)


def test_golden_chat_stream(client, deterministic_length):
    r = client.post(CHAT, json=chat_body(stream=True, max_tokens=6, **deterministic_length))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    events = parse_sse(r.text)
    check_chat_stream_structure(events, "length", usage=False)
    assert any(is_content_chunk(e) for e in events), "the random model's text never streamed"
    check_golden("chat_stream", events)


def test_golden_chat_stream_with_usage(client, deterministic_length):
    body = chat_body(stream=True, max_tokens=6, stream_options={"include_usage": True}, **deterministic_length)
    events = parse_sse(client.post(CHAT, json=body).text)
    check_chat_stream_structure(events, "length", usage=True)
    assert events[-2]["usage"]["completion_tokens"] == 6
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    full = client.post(CHAT, json={**body, "stream": False}).json()
    assert streamed == full["choices"][0]["message"]["content"]
    assert full["usage"]["prompt_tokens"] == events[-2]["usage"]["prompt_tokens"]
    check_golden("chat_stream_usage", events)


def test_chat_stream_n2_frames_each_choice(client, deterministic_length):
    body = chat_body(stream=True, n=2, max_tokens=3, stream_options={"include_usage": True}, **deterministic_length)
    events = parse_sse(client.post(CHAT, json=body).text)
    check_chat_stream_structure(events, "length", usage=True, n=2)
    assert events[-2]["usage"]["completion_tokens"] == 6


@pytest.fixture
def fixed_tool_call(app, monkeypatch):
    """The tiny model never writes a parsable call: parse() (given tools) returns a fixed one instead."""
    fix_tool_calls(app, monkeypatch)


# The grammar of a forced call with this tool lets the random model write one of two cities, then end: a whole
# call, not one cut by max_tokens (that would finish with "length")
ENUM_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["北京", "上海"]}}, "required": ["city"]}}}


def test_golden_streamed_tool_call(client, fixed_tool_call):
    body = chat_body(stream=True, max_tokens=60, tools=[ENUM_WEATHER],
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    events = parse_sse(client.post(CHAT, json=body).text)
    check_chat_stream_structure(events, "tool_calls", usage=False)
    calls = [e["choices"][0]["delta"]["tool_calls"] for e in events[:-1] if "tool_calls" in e["choices"][0]["delta"]]
    assert calls == [[{"index": 0, "id": FIXED_CALL.id, "type": "function",
                       "function": {"name": "get_weather", "arguments": ""}}],
                     [{"index": 0, "function": {"arguments": FIXED_CALL.arguments}}]]
    assert not any(is_content_chunk(e) for e in events), "a forced call must not stream text"
    check_golden("chat_stream_tool_call", events)

    full = client.post(CHAT, json={**body, "stream": False}).json()["choices"][0]
    assert full["finish_reason"] == "tool_calls"
    assert full["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": FIXED_CALL.id, "type": "function", "function": {"name": "get_weather",
                                                                "arguments": FIXED_CALL.arguments}}]}


def test_streamed_legacy_function_call(client, fixed_tool_call):
    body = chat_body(stream=True, max_tokens=60, functions=[ENUM_WEATHER["function"]],
                     function_call={"name": "get_weather"})
    events = parse_sse(client.post(CHAT, json=body).text)
    check_chat_stream_structure(events, "function_call", usage=False)
    deltas = [e["choices"][0]["delta"] for e in events[1:-2]]
    assert deltas == [{"function_call": {"name": "get_weather", "arguments": FIXED_CALL.arguments}}]


# --- streamed tool calls through the real parsers (the engine replaced by a fixed token stream) ----------------

def fake_generate(token_ids: list[int]):
    async def generate(prompt_ids, params, request_id=None):
        for i, token in enumerate(token_ids):
            await asyncio.sleep(0)
            last = i == len(token_ids) - 1
            yield Delta(request_id or "fake", 0, "", [token], finish_reason="stop" if last else None,
                        num_prompt_tokens=len(prompt_ids), num_output_tokens=i + 1)
    return generate


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, hf_tokenizer_dir, hf):
    config = llama_config(hf.vocab_size)
    return make_hf_dir(tmp_path_factory.mktemp("server-qwen"), random_llama_state(config), config, hf_tokenizer_dir)


MODEL_CALL_TEXT = {  # what each model family writes for get_weather(city="Beijing")
    "chatglm3": 'get_weather\n```python\ntool_call(city="Beijing")\n```',
    "jinja": '{"name": "get_weather", "arguments": {"city": "Beijing"}}',
}


@pytest.mark.parametrize("family", ["chatglm3", "jinja"])
def test_streamed_tool_call_matches_non_streamed(request, family, monkeypatch):
    model_dir = request.getfixturevalue("tiny_dir" if family == "chatglm3" else "qwen_dir")
    app = make_app(model_dir)
    with TestClient(app, raise_server_exceptions=False) as c:
        llm = state_of(app).llm
        assert llm.chat_format.name == family
        ids = llm.tokenizer.encode(MODEL_CALL_TEXT[family])
        monkeypatch.setattr(state_of(app).client, "generate", fake_generate(ids))
        body = chat_body(tools=[WEATHER], messages=[{"role": "user", "content": "Weather in Beijing?"}])
        full = c.post(CHAT, json=body).json()["choices"][0]
        assert full["finish_reason"] == "tool_calls" and full["message"]["content"] is None
        [call] = full["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Beijing"}'}

        events = parse_sse(c.post(CHAT, json={**body, "stream": True}).text)
        check_chat_stream_structure(events, "tool_calls", usage=False)
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert content == "", f"the call leaked into the streamed text: {content!r}"
        deltas = [e["choices"][0]["delta"]["tool_calls"][0] for e in events[:-1]
                  if "tool_calls" in e["choices"][0]["delta"]]
        assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
        assert "".join(d["function"]["arguments"] for d in deltas) == '{"city": "Beijing"}'


# --- 6. /v1/completions ---------------------------------------------------------------------------------------

def test_completions_two_prompts_times_n2(client, app):
    tok, llm = state_of(app).llm.tokenizer, state_of(app).llm
    body = {"model": "tiny", "prompt": ["Hello world", "你好"], "n": 2, "max_tokens": 3, "ignore_eos": True,
            "echo": True, "seed": 7}
    r = client.post(COMPLETIONS, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    choices = out["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in choices)
    prompts = [tok.decode(llm.encode_prompt(p)) for p in body["prompt"]]
    for c in choices:  # index = prompt number * n + choice number
        assert c["text"].startswith(prompts[c["index"] // 2]), (c, prompts)
    assert out["usage"] == {"prompt_tokens": sum(len(llm.encode_prompt(p)) for p in body["prompt"]),
                            "completion_tokens": 12,
                            "total_tokens": sum(len(llm.encode_prompt(p)) for p in body["prompt"]) + 12}


def test_completions_token_id_prompts(client, app):
    tok = state_of(app).llm.tokenizer
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    r = client.post(COMPLETIONS, json={"model": "tiny", "prompt": prompts, "n": 2, "max_tokens": 2,
                                       "ignore_eos": True, "echo": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1, 2, 3]
    for c in choices:
        assert c["text"].startswith(tok.decode(prompts[c["index"] // 2]))
    assert r.json()["usage"]["prompt_tokens"] == 7 and r.json()["usage"]["completion_tokens"] == 8
    single = client.post(COMPLETIONS, json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}).json()
    assert [c["index"] for c in single["choices"]] == [0] and single["usage"]["prompt_tokens"] == 3


def test_completions_echo_prepends_the_prompt(client, app):
    body = {"model": "tiny", "prompt": "Hello world", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = client.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
    echoed = client.post(COMPLETIONS, json={**body, "echo": True}).json()["choices"][0]["text"]
    llm = state_of(app).llm
    assert echoed == llm.tokenizer.decode(llm.encode_prompt("Hello world")) + plain
    assert echoed.startswith("Hello world")


def test_completions_stream_matches_batch(client):
    body = {"model": "tiny", "prompt": ["Hello world", "你好"], "n": 2, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True}
    batch = client.post(COMPLETIONS, json=body).json()
    r = client.post(COMPLETIONS, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == batch["usage"]
    texts, finishes = {}, {}
    for e in events[:-2]:
        [c] = e["choices"]
        assert e["object"] == "text_completion" and e["id"] == usage_chunk["id"]
        assert c["index"] not in finishes, "a chunk after the choice finished"
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"] is not None:
            finishes[c["index"]] = c["finish_reason"]
    assert finishes == {i: "length" for i in range(4)}
    assert texts == {c["index"]: c["text"] for c in batch["choices"]}


# --- 7. legacy ChatGLM POST / ---------------------------------------------------------------------------------

def test_legacy_history_grows_by_one_pair(client):
    history = [["你好", "你好！有什么可以帮你？"]]
    r = client.post(LEGACY, json={"prompt": "晚上睡不着应该怎么办", "history": history, "max_length": 60})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"response", "history", "status", "time"}
    assert out["status"] == 200 and isinstance(out["response"], str)
    assert out["history"] == history + [["晚上睡不着应该怎么办", out["response"]]]
    datetime.strptime(out["time"], "%Y-%m-%d %H:%M:%S")


def test_legacy_max_length_below_the_prompt(client):
    r = client.post(LEGACY, json={"prompt": "hi", "history": [["a", "b"]], "max_length": 3})
    assert_openai_error(r, 400, param="max_length", code="invalid_value", contains=["max_length=3"])


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "history": [], "max_length": 0, "top_p": 0, "temperature": 0},
    {"prompt": "hi", "history": None, "max_length": None, "top_p": None, "temperature": None},
    {"prompt": ""},
], ids=["zeros", "nulls", "bare"])
def test_legacy_empty_values_fall_back_to_defaults(client, body):
    r = client.post(LEGACY, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["history"] == [[body["prompt"], r.json()["response"]]]
