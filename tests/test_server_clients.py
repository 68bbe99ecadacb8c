"""The HTTP server driven by the clients people actually point at it: the openai SDK, LangChain's ChatOpenAI,
LangChain's legacy `ChatGLM` (POST /) and `ChatGLM3` (/v1/chat/completions), and raw httpx.

One real `glmkit serve` process (the embedded default model, Qwen2.5-Coder-0.5B-Instruct on CPU) serves the
whole module, under its own name and as `chatglm3-6b` (the model name LangChain's ChatGLM3 sends by default).
Answers are kept short (greedy, few tokens) because the CPU is slow.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from default_server import ALIAS, ARITHMETIC, COLORS, EMBEDDING_MODEL, MODEL, WEATHER_EN, WEATHER_TOOL, WEATHER_ZH

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*langchain-community.*is being sunset:DeprecationWarning")]

@pytest.fixture(scope="module")
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=180) as c:
        yield c


def _norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


def _cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b))


# -- openai SDK --------------------------------------------------------------------------------------------

def test_openai_models_list_names_every_served_model(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and ALIAS in ids
    assert EMBEDDING_MODEL in ids


def test_openai_chat_non_stream(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ARITHMETIC}],
                                       max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip() == "5"
    assert choice.finish_reason == "stop"
    assert not choice.message.tool_calls
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_alias_model_name_is_echoed(client):
    r = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": ARITHMETIC}],
                                       max_tokens=8, temperature=0)
    assert r.model == ALIAS
    assert r.choices[0].message.content.strip() == "5"


def test_openai_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": COLORS}],
                                            max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1, "every chunk of one stream carries the same id"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in with_choices if c.choices[0].delta.content]
    text = "".join(pieces)
    assert text.strip(), "the stream carried no text"
    assert len(pieces) >= 2, f"expected the answer in several deltas, got {pieces!r}"
    finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
    assert finishes == ["stop"], finishes
    assert with_choices[-1].choices[0].finish_reason == "stop"
    # include_usage: one final chunk with no choices and the usage
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_chat_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ARITHMETIC}],
                                                 max_tokens=8, temperature=0, stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == "5"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def tool_response(client):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": WEATHER_EN}],
                                          tools=[WEATHER_TOOL], max_tokens=48, temperature=0)


def test_openai_tools_non_stream(tool_response):
    choice = tool_response.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Beijing"}
    assert not choice.message.content  # the call is not repeated as text


@pytest.fixture(scope="module")
def tool_stream_chunks(client):
    return list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": WEATHER_ZH}], tools=[WEATHER_TOOL],
        max_tokens=48, temperature=0, stream=True))


def test_openai_tools_stream_assembles_like_an_openai_client(tool_stream_chunks):
    calls: dict[int, dict] = {}
    first_piece: dict[int, object] = {}
    finish = None
    for chunk in tool_stream_chunks:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                if tc.index not in calls:
                    first_piece[tc.index] = tc
                    calls[tc.index] = {"id": None, "name": "", "arguments": ""}
                slot = calls[tc.index]
                if tc.id:
                    slot["id"] = tc.id
                if tc.function is not None:
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
            if choice.finish_reason:
                finish = choice.finish_reason
    assert finish == "tool_calls"
    assert list(calls) == [0]
    head = first_piece[0]
    assert head.id and head.type == "function" and head.function.name == "get_weather"
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "北京"}


def test_openai_tools_stream_does_not_repeat_the_call_as_text(tool_stream_chunks):
    content = "".join(c.choices[0].delta.content or "" for c in tool_stream_chunks if c.choices)
    assert content.strip() == "", f"the tool call leaked into delta.content: {content!r}"


def test_openai_tool_result_round_trip(client, tool_response):
    call = tool_response.choices[0].message.tool_calls[0]
    messages = [
        {"role": "system", "content": "You are a helpful assistant. When a tool result is available, answer the "
                                      "user in one plain sentence using it."},
        {"role": "user", "content": WEATHER_EN},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"city": "Beijing", "condition": "sunny", "temperature_c": 25})},
        # the 0.5B model repeats the call unless asked once more; the tool result is what it must use
        {"role": "user", "content": "Using the tool result, tell me the weather in one sentence."},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=40,
                                       temperature=0)
    choice = r.choices[0]
    assert not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    text = choice.message.content.lower()
    # "sunny" and "25" are only in the tool message: the server rendered it into the prompt
    assert "sunny" in text and "25" in text, text


def test_openai_legacy_completions(client):
    r = client.completions.create(model=MODEL, prompt="def add(a, b):\n    return", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    choice = r.choices[0]
    assert "a + b" in choice.text
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    # two prompts at once -> two choices, in order
    r2 = client.completions.create(model=MODEL, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=3, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1]
    assert "4" in r2.choices[0].text and "d" in r2.choices[1].text


def test_openai_embeddings(client):
    one = client.embeddings.create(model=EMBEDDING_MODEL, input="The cat sits on the mat.")
    assert one.model == EMBEDDING_MODEL
    assert len(one.data) == 1 and one.data[0].index == 0
    assert len(one.data[0].embedding) == 384
    assert abs(_norm(one.data[0].embedding) - 1.0) < 1e-3
    assert one.usage.prompt_tokens > 0

    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    three = client.embeddings.create(model=EMBEDDING_MODEL, input=texts)
    assert [d.index for d in three.data] == [0, 1, 2]
    vecs = [d.embedding for d in three.data]
    assert all(len(v) == 384 and abs(_norm(v) - 1.0) < 1e-3 for v in vecs)
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[0], vecs[2]) + 0.2
    assert _cos(vecs[0], vecs[1]) > _cos(vecs[1], vecs[2]) + 0.2
    # batching does not change a text's vector (the SDK asks for base64 by default; float must agree)
    assert max(abs(a - b) for a, b in zip(one.data[0].embedding, vecs[0])) < 1e-4
    flt = client.embeddings.create(model=EMBEDDING_MODEL, input=texts[0], encoding_format="float")
    assert max(abs(a - b) for a, b in zip(flt.data[0].embedding, vecs[0])) < 1e-4
    short = client.embeddings.create(model=EMBEDDING_MODEL, input=texts[0], dimensions=64)
    assert len(short.data[0].embedding) == 64 and abs(_norm(short.data[0].embedding) - 1.0) < 1e-3


def test_openai_unknown_model_is_not_found(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    e = info.value
    assert e.status_code == 404
    assert "gpt-4o" in e.message and MODEL in e.message and ALIAS in e.message
    assert e.body["code"] == "model_not_found" and e.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedder", input="hi")


def test_openai_bad_temperature_is_bad_request(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=5)
    e = info.value
    assert e.status_code == 400
    assert "temperature" in e.message
    assert e.body["param"] == "temperature" and e.body["type"] == "invalid_request_error"


def test_openai_over_long_prompt_is_a_400_not_a_500(client, server):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 40000}],
                                       max_tokens=4)
    e = info.value
    assert e.status_code == 400
    assert e.body["code"] == "context_length_exceeded" and e.body["param"] == "messages"
    assert "32768" in e.message
    # the same for the legacy completions route
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hello " * 40000, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"
    # a max_tokens far beyond the context is clamped to the room left, not rejected
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ARITHMETIC}],
                                       max_tokens=1_000_000, temperature=0)
    assert r.choices[0].message.content.strip() == "5"


# -- clients that go away ----------------------------------------------------------------------------------
# Last in the module: if an abort does not happen, the orphaned request keeps the CPU busy for a few seconds.

def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def _wait_aborted(server, before: float, timeout_s: float = 6.0) -> dict:
    """Wait until one more request was aborted and nothing is left running; -> the last metrics seen."""
    names = ("glmkit_requests_aborted_total", "glmkit_http_requests_in_flight", "glmkit_requests_running")
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {n: _metric(server, n) for n in names}
        seen["ok"] = (seen["glmkit_requests_aborted_total"] > before and seen["glmkit_http_requests_in_flight"] == 0
                      and seen["glmkit_requests_running"] == 0)
        if seen["ok"] or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


LONG_ANSWER = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
               "max_tokens": 64, "ignore_eos": True, "temperature": 0}


def test_stream_client_disconnect_aborts_the_request(server):
    before = _metric(server, "glmkit_requests_aborted_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**LONG_ANSWER, "stream": True},
                      timeout=60) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                break  # leave once the engine is generating (the first event comes before it starts)
    seen = _wait_aborted(server, before)
    assert seen["ok"], f"the engine kept generating for a client that left: {seen}"


def test_non_stream_client_disconnect_aborts_the_request(server):
    before = _metric(server, "glmkit_requests_aborted_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=LONG_ANSWER, timeout=1.0)
    seen = _wait_aborted(server, before)
    assert seen["ok"], f"the engine kept generating for a client that left: {seen}"


def test_openai_chat_completions_parse_with_a_pydantic_model(client):
    """The SDK's structured-output helper sends a strict json_schema response_format and parses the answer."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str
        population_millions: float

    completion = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as a JSON object."}],
        response_format=City, temperature=0, max_tokens=60)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name and parsed.country
    assert completion.choices[0].finish_reason == "stop"


def test_openai_forced_tool_call_is_a_call(client):
    """tool_choice names a function: the model's answer is that call (held to its schema), streamed or not."""
    tools = [WEATHER_TOOL, {"type": "function", "function": {
        "name": "magic_function", "description": "Applies a magic function to an input.",
        "parameters": {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]}}}]
    choice = {"type": "function", "function": {"name": "magic_function"}}
    messages = [{"role": "user", "content": "What is the value of magic_function(3)?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=choice,
                                       temperature=0, max_tokens=40)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("magic_function", {"input": 3})]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice=choice,
                                                 temperature=0, max_tokens=40, stream=True))
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
