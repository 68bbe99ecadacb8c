"""Constrained decoding: token tables for every tokenizer kind, the chat grammars (forced calls in each format's
own syntax, JSON answers), the engine holding random tiny models to them (a random model writes garbage unless
the grammar holds it), and the HTTP surface (response_format, forced calls, errors)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from checkpoint_fixtures import llama_config, make_hf_dir, random_llama_state
from server_api_support import assert_openai_error, chat_body, parse_sse
from tokenizer_fixtures import QWEN_TEMPLATE

from glmkit import LLM, SamplingParams
from glmkit.chat import ChatServing, get_chat_format
from glmkit.engine.sampler import Sampler
from glmkit.engine.step import StepRow
from glmkit.engine.structured import Grammars, StructuredOutput, unpack_mask
from glmkit.errors import InvalidParameterError

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
HERMES_TEMPLATE = QWEN_TEMPLATE + "{#- tools: calls are written as <tool_call> blocks -#}"
MESSAGES = [{"role": "user", "content": "北京天气怎么样？"}]
# For random tiny models, whose strings only end where the grammar ends them
SHORT_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tokenizers(sp, g4, hf):
    return {"sp": sp, "g4": g4, "hf": hf}


def formats(tokenizers):
    return {"chatglm3": get_chat_format("chatglm3", tokenizer=tokenizers["sp"], model_type="test"),
            "glm4": get_chat_format("glm4", tokenizer=tokenizers["g4"], model_type="test"),
            "hermes": get_chat_format("jinja", tokenizer=tokenizers["hf"], model_type="test", template=HERMES_TEMPLATE)}


def accepts(tokenizer, structured: StructuredOutput, ids: list[int]) -> bool:
    """Whether the grammar takes these ids one by one and is then complete."""
    matcher = Grammars(tokenizer, tokenizer.vocab_size).matcher(structured)
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def model_output(f, name: str | None, body: str) -> list[int]:
    """Output ids as each format's model writes a segment (metadata line, body)."""
    tok = f.tokenizer
    if f.name == "chatglm3":
        return tok.encode((name or "") + "\n") + tok.encode(body)
    if f.name == "glm4":
        return tok.encode((name or "") + "\n" + body)
    return tok.encode(body)


# --- token tables -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sp", "g4", "hf"])
def test_token_bytes_spell_the_encoded_text(tokenizers, kind):
    tok = tokenizers[kind]
    table = tok.token_bytes()
    for text in ["hello world", "北京天气怎么样？", '{"city": "北京", "n": 3}', "a\n\tb  c", "😀 é"]:
        spelled = b"".join(table[i] or b"" for i in tok.encode(text))
        # SentencePiece writes a space before the first piece (its dummy prefix); decode drops it.
        assert spelled.removeprefix(b" " if kind == "sp" else b"") == text.encode("utf-8"), (kind, text)


@pytest.mark.parametrize("kind", ["sp", "g4", "hf"])
def test_json_schema_grammar_on_every_tokenizer(tokenizers, kind):
    tok = tokenizers[kind]
    structured = StructuredOutput.json_schema(PERSON)
    if kind == "sp":  # text encoded alone starts with SentencePiece's dummy-prefix space (chat grammars allow it)
        structured = StructuredOutput.lark('start: " "? ' + structured.grammar.removeprefix("start: "))
    good = json.dumps({"name": "Li Lei", "age": 30, "tags": ["a"]}, ensure_ascii=False)
    assert accepts(tok, structured, tok.encode(good))
    assert not accepts(tok, structured, tok.encode(json.dumps({"name": "Li", "age": 130, "tags": []})))
    assert not accepts(tok, structured, tok.encode('{"name": "Li", "age": 3}'))  # tags missing
    assert accepts(tok, structured, tok.encode('{"name":"Li","age":3,"tags":[]}'))  # compact
    assert accepts(tok, structured, tok.encode('{\n  "name": "Li",\n  "age": 3,\n  "tags": [\n    "b"\n  ]\n}'))
    assert not accepts(tok, structured, tok.encode('{"name": "Li",\n\n"age": 3, "tags": []}'))  # one newline
    assert not accepts(tok, structured, tok.encode('{"name": "Li",' + " " * 17 + '"age": 3, "tags": []}'))


def test_other_constraint_kinds(hf):
    assert accepts(hf, StructuredOutput.regex(r"^\d{3}-[a-z]+$"), hf.encode("123-abc"))
    assert not accepts(hf, StructuredOutput.regex(r"\d{3}"), hf.encode("12"))
    assert accepts(hf, StructuredOutput.choice(["yes", "no"]), hf.encode("no"))
    assert not accepts(hf, StructuredOutput.choice(["yes", "no"]), hf.encode("maybe"))
    assert accepts(hf, StructuredOutput.json_object(), hf.encode('{"any": [1, 2]}'))
    assert not accepts(hf, StructuredOutput.json_object(), hf.encode("[1, 2]"))


@pytest.mark.parametrize("structured, field, words", [
    (StructuredOutput.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
                                  "response_format.json_schema.schema"), "response_format.json_schema.schema", ""),
    (StructuredOutput.lark("start: undefined_rule"), "grammar", "cannot be used for constrained decoding"),
])
def test_unusable_grammars_name_their_field(hf, structured, field, words):
    with pytest.raises(InvalidParameterError) as e:
        Grammars(hf, hf.vocab_size).check(structured)
    assert e.value.field == field and words in str(e.value)
    with pytest.raises(InvalidParameterError) as e:
        StructuredOutput.json_schema("{not json")
    assert e.value.field == "json_schema"


# --- chat grammars: forced calls in each format's syntax ---------------------------------------------------

CALLS = {  # format -> (metadata line, body) of a call to get_weather as that model writes it
    "chatglm3": [("get_weather", "```python\ntool_call(city='北京', days=3, metric=True)\n```"),
                 ("get_weather", '```python\ntool_call(city="北京")\n```')],
    "glm4": [("get_weather", '{"city": "北京", "days": 3, "metric": true}'), ("get_weather", '{"city": "北京"}')],
    "hermes": [(None, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京", "days": 3, "metric": true}}'
                      '\n</tool_call>'),
               (None, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>')],
}


@pytest.mark.parametrize("name", ["chatglm3", "glm4", "hermes"])
def test_forced_call_grammar_takes_the_formats_own_call_and_parses(tokenizers, name):
    f = formats(tokenizers)[name]
    serving = ChatServing(f)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        prompt = serving.render(MESSAGES, [WEATHER, SEARCH], tool_choice=choice)
        for metadata, body in CALLS[name]:
            ids = model_output(f, metadata, body)
            assert accepts(f.tokenizer, prompt.structured, ids), (name, choice, body)
            [call] = serving.parse(prompt, ids).tool_calls
            assert call.name == "get_weather" and json.loads(call.arguments)["city"] == "北京"
    # Not a call, or a call missing a required argument, or to a tool not forced: refused.
    named = serving.render(MESSAGES, [WEATHER, SEARCH], tool_choice={"type": "function", "function": {"name": "search"}})
    metadata, body = CALLS[name][0]
    assert not accepts(f.tokenizer, named.structured, model_output(f, metadata, body))
    assert not accepts(f.tokenizer, named.structured, model_output(f, None, "我不知道。"))
    required = serving.render(MESSAGES, [WEATHER, SEARCH], tool_choice="required")
    missing = {"chatglm3": "```python\ntool_call(days=3)\n```", "glm4": '{"days": 3}',
               "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"days": 3}}\n</tool_call>'}[name]
    assert not accepts(f.tokenizer, required.structured, model_output(f, "get_weather", missing))


@pytest.mark.parametrize("name", ["glm4", "hermes"])
def test_parallel_calls_where_the_format_allows(tokenizers, name):
    f = formats(tokenizers)[name]
    serving = ChatServing(f)
    if name == "glm4":
        ids = model_output(f, "get_weather", '{"city": "北京"}') + [f.special("<|assistant|>")] + \
            model_output(f, "search", '{"query": "天气"}')
    else:
        ids = f.tokenizer.encode('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "search", "arguments": {"query": "天气"}}\n</tool_call>')
    several = serving.render(MESSAGES, [WEATHER, SEARCH], tool_choice="required")
    assert accepts(f.tokenizer, several.structured, ids)
    assert [c.name for c in serving.parse(several, ids).tool_calls] == ["get_weather", "search"]
    one = serving.render(MESSAGES, [WEATHER, SEARCH], tool_choice="required", parallel_tool_calls=False)
    assert not accepts(f.tokenizer, one.structured, ids)


@pytest.mark.parametrize("name", ["chatglm3", "glm4", "hermes"])
def test_json_answer_or_call_with_tools_on_auto(tokenizers, name):
    f = formats(tokenizers)[name]
    serving = ChatServing(f)
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answer = json.dumps({"name": "Li", "age": 3, "tags": []})
    plain = serving.render(MESSAGES, response_format=rf)
    assert accepts(f.tokenizer, plain.structured, model_output(f, "", answer))
    assert json.loads(serving.parse(plain, model_output(f, "", answer)).content) == json.loads(answer)
    assert not accepts(f.tokenizer, plain.structured, model_output(f, "", "Li is 3."))
    auto = serving.render(MESSAGES, [WEATHER], response_format=rf)
    assert accepts(f.tokenizer, auto.structured, model_output(f, "", answer))
    metadata, body = CALLS[name][1]
    assert accepts(f.tokenizer, auto.structured, model_output(f, metadata, body))


@pytest.mark.parametrize("rf, field", [
    ({"type": "bogus"}, "response_format.type"), ("json", "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
])
def test_response_format_errors_name_the_field(tokenizers, rf, field):
    with pytest.raises(InvalidParameterError) as e:
        ChatServing(formats(tokenizers)["glm4"]).render(MESSAGES, response_format=rf)
    assert e.value.field == field


def test_text_response_format_is_no_constraint(tokenizers):
    serving = ChatServing(formats(tokenizers)["glm4"])
    assert serving.render(MESSAGES, response_format={"type": "text"}).structured is None


# --- the sampler applies a row's mask ------------------------------------------------------------------------

def test_sampler_masks_constrained_rows_only():
    vocab = 70
    words = torch.zeros(2, 3, dtype=torch.int32)
    words[0, 1] = 1 << 3          # row 0 may only pick token 35
    words[1, 2] = 1 << 1          # row 1 only token 65
    assert unpack_mask(words, vocab).nonzero().tolist() == [[0, 35], [1, 65]]
    logits = torch.randn(3, vocab)
    logits[:, 7] = 50.0           # the model's favourite
    params = SamplingParams(temperature=0)
    rows = [StepRow(i, [1], 0, [0], True, params, allowed=words[i] if i < 2 else None) for i in range(3)]
    sampler = Sampler()
    assert [s.token_id for s in sampler(logits, rows)] == [35, 65, 7]
    assert sampler.sample_ids(logits, rows).tolist() == [35, 65, 7]
    sampled = SamplingParams(temperature=1.5, top_p=0.9, seed=3)
    rows = [StepRow(i, [1], 0, [0], True, sampled, allowed=words[i]) for i in range(2)]
    assert [s.token_id for s in sampler(logits, rows)] == [35, 65]
    assert not sampler.batchable(rows, ahead=1)  # the next mask depends on this token: never run ahead


# --- the engine holds random tiny models to the grammar -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory, hf_tokenizer_dir, hf):
    config = llama_config(hf.vocab_size)
    d = make_hf_dir(tmp_path_factory.mktemp("qwen-structured"), random_llama_state(config, seed=5), config,
                    hf_tokenizer_dir)
    return LLM(str(d), dtype="float32", device="cpu", chat_format="jinja")


@pytest.fixture(scope="module")
def tiny_glm(glm_dir):
    return LLM(str(glm_dir), dtype="float32", device="cpu")


@pytest.mark.parametrize("which", ["tiny_qwen", "tiny_glm"])
def test_random_models_write_valid_json_under_the_grammar(request, which):
    llm = request.getfixturevalue(which)
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    free = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads(free)  # the random model, unconstrained
    outs = llm.chat([MESSAGES] * 3, [SamplingParams(temperature=t, max_tokens=200, seed=s)
                                     for t, s in ((0, None), (1.0, 1), (1.3, 2))], response_format=rf)
    for out in outs:
        choice = out.outputs[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.text), PERSON)


def test_constrained_and_free_requests_share_a_batch(tiny_qwen):
    rf = {"type": "json_object"}
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone_free = tiny_qwen.chat(MESSAGES, greedy)[0].outputs[0].token_ids
    alone_json = tiny_qwen.chat(MESSAGES, greedy, response_format=rf)[0].outputs[0].token_ids
    prompt_free = tiny_qwen.chat_serving.render(MESSAGES)
    prompt_json = tiny_qwen.chat_serving.render(MESSAGES, response_format=rf)
    limit = tiny_qwen.engine.max_model_len
    params = [tiny_qwen.chat_serving.sampling_params(greedy, p, limit) for p in (prompt_free, prompt_json) * 2]
    outs = tiny_qwen._run([p.prompt_ids for p in (prompt_free, prompt_json) * 2], params)
    assert [o.outputs[0].token_ids for o in outs] == [alone_free, alone_json] * 2


def test_forced_call_with_a_random_model(tiny_qwen):
    f = get_chat_format("jinja", tokenizer=tiny_qwen.tokenizer, model_type="test", template=HERMES_TEMPLATE)
    tiny_qwen.chat_serving = ChatServing(f)
    try:
        short = {"type": "function", "function": {"name": "search", "parameters": {  # a random model's strings
            "type": "object", "properties": {"query": {"type": "string", "maxLength": 8}}, "required": ["query"]}}}
        out = tiny_qwen.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=120), tools=[WEATHER, short],
                             tool_choice={"type": "function", "function": {"name": "search"}})[0].outputs[0]
    finally:
        tiny_qwen.chat_serving = ChatServing(tiny_qwen.chat_format)
    assert out.finish_reason == "stop", out
    assert len(out.tool_calls) == 1, tiny_qwen.tokenizer.decode(out.token_ids, skip_special_tokens=False)
    [call] = out.tool_calls
    assert call.name == "search" and isinstance(json.loads(call.arguments)["query"], str)


# --- HTTP --------------------------------------------------------------------------------------------------

def test_response_format_over_http(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.post(CHAT, json=chat_body(response_format=rf, max_tokens=200))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    events = parse_sse(client.post(CHAT, json=chat_body(response_format=rf, max_tokens=200, stream=True)).text)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and e["choices"])
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("rf, param", [
    ({"type": "bogus"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/nowhere"}}}}}, "response_format.json_schema.schema"),
])
def test_bad_response_formats_are_400(client, rf, param):
    assert_openai_error(client.post(CHAT, json=chat_body(response_format=rf)), 400, param=param)


def test_forced_call_over_http_streams_the_call(client):
    body = chat_body(tools=[SHORT_WEATHER], tool_choice="required", max_tokens=120, temperature=0,
                     parallel_tool_calls=False)
    full = client.post(CHAT, json=body).json()["choices"][0]
    assert full["finish_reason"] == "tool_calls" and full["message"]["content"] is None
    [call] = full["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and "city" in json.loads(call["function"]["arguments"])
    events = parse_sse(client.post(CHAT, json={**body, "stream": True}).text)
    events = [e for e in events if isinstance(e, dict)]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    streamed = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert streamed[0]["function"]["name"] == "get_weather"
    assert json.loads(streamed[1]["function"]["arguments"]) == json.loads(call["function"]["arguments"])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas)  # never markup as content


@pytest.mark.parametrize("max_tokens", [3, 8, 15])
def test_a_forced_call_cut_short_is_length_and_never_text(client, max_tokens):
    """max_tokens ends the call inside its name, its fence or its arguments: finish_reason "length" (as OpenAI
    reports a cut call), no call (it does not parse), and none of its markup as content, streamed or not."""
    body = chat_body(tools=[SHORT_WEATHER], tool_choice="required", max_tokens=max_tokens, temperature=0)
    choice = client.post(CHAT, json=body).json()["choices"][0]
    assert choice["finish_reason"] == "length" and not choice["message"]["content"], choice
    events = [e for e in parse_sse(client.post(CHAT, json={**body, "stream": True}).text) if isinstance(e, dict)]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert not any(d.get("content") for d in deltas) and events[-1]["choices"][0]["finish_reason"] == "length"


def test_chatglm3_demo_quirks(client):
    composite = {"get_weather": {"name": "get_weather", "description": "天气",
                                 "params": [{"name": "city", "description": "城市", "type": "int", "required": True}]}}
    body = chat_body(model="tiny", tools=composite, tool_choice="required", max_tokens=120, temperature=0,
                     parallel_tool_calls=False)  # one call, then the end (the random model would write more)
    choice = client.post(CHAT, json=body).json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert "city" in json.loads(choice["message"]["function_call"]["arguments"])


def test_objects_that_list_their_properties_are_closed():
    from glmkit.engine.structured import grammar_schema

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}},
                                               "free": {"type": "object"}},
              "$defs": {"X": {"properties": {"y": {}}}},
              "anyOf": [{"properties": {"e": {}}}], "allOf": [{"properties": {"f": {}}}]}
    closed = grammar_schema(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["free"]  # no properties listed: any object
    assert closed["$defs"]["X"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]  # closing a branch would refuse the others' keys
    assert grammar_schema({"properties": {}, "additionalProperties": True})["additionalProperties"] is True
    assert "additionalProperties" not in schema  # a copy


def test_date_times_are_written_as_every_reader_takes_them(hf):
    from rfc3339_validator import validate_rfc3339

    structured = StructuredOutput.json_schema({"type": "string", "format": "date-time"})
    for good in ["2024-02-28T23:59:59Z", "2024-12-31T08:00:00.25+08:00"]:
        assert validate_rfc3339(good) and accepts(hf, structured, hf.encode(json.dumps(good)))
    # Forms the grammar engine's own date-time allows and Python, pydantic and jsonschema refuse
    for bad in ["2024-06-30t19:00:59+09:00", "2024-06-30T19:00:60Z", "2024-06-30T19:00:59z", "2024-02-30T10:00:00Z"]:
        assert not accepts(hf, structured, hf.encode(json.dumps(bad))), bad
    date = StructuredOutput.json_schema({"type": "string", "format": "date"})
    assert accepts(hf, date, hf.encode('"2024-01-31"')) and not accepts(hf, date, hf.encode('"2024-04-31"'))
