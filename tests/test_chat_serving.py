"""The chat-serving layer (glmkit.chat.serving): render with every tool_choice, sampling params, and the
incremental display of ChatStream — equal to the one final parse for plain answers, hiding tool calls, the
same whatever the chunking, and linear (counted in work done, not timed)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit.chat import ChatPrompt, ChatServing, get_chat_format
from glmkit.chat.serving import display_text
from glmkit.chat.display import MAX_HELD_IDS, TextDecoder
from glmkit.engine.sampling_params import SamplingParams
from glmkit.errors import ContextLengthError, InvalidParameterError
from tokenizer_fixtures import QWEN_TEMPLATE

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "北京天气怎么样？"}]
FORMAT_TOKENIZER = {"chatglm2": "sp", "characterglm": "sp", "chatglm3": "sp", "glm4": "g4", "jinja": "hf"}
MARKER = "[[训练时间]]"


@pytest.fixture(scope="session")
def tokenizers(sp, g4, hf):
    return {"sp": sp, "g4": g4, "hf": hf}


def make_format(name, tokenizers, **kwargs):
    return get_chat_format(name, tokenizer=tokenizers[FORMAT_TOKENIZER[name]], model_type="test", **kwargs)


def answer_ids(f, *segments: str, metadata: tuple[str, ...] = ()) -> list[int]:
    """Output ids as the model writes them: for ChatGLM3/GLM-4 each segment is `metadata\\n` + text, and
    segments are joined by the <|assistant|> id."""
    tok = f.tokenizer
    if f.segment_token is None:
        assert len(segments) == 1
        return tok.encode(segments[0])
    ids: list[int] = []
    for n, text in enumerate(segments):
        if n:
            ids.append(tok.special_id("<|assistant|>"))
        meta = metadata[n] if n < len(metadata) else ""
        ids += tok.encode(meta + "\n") + tok.encode(text) if f.name == "chatglm3" else tok.encode(meta + "\n" + text)
    return ids


def feed(stream, ids: list[int], sizes=(1,)) -> list[str]:
    """Feed ids in chunks of the given sizes (cycled), then finish; -> every delta, the last one last."""
    deltas, pos, n = [], 0, 0
    while pos < len(ids):
        size = sizes[n % len(sizes)]
        deltas.append(stream.feed(ids[pos:pos + size]))
        pos, n = pos + size, n + 1
    deltas.append(stream.feed([], finished=True))
    return deltas


def withheld_tail(content: str, openings: tuple[str, ...]) -> str:
    """The longest end of content that is a proper start of an opening, with the whitespace before it: the
    text held until the end."""
    for k in range(max(map(len, openings), default=1) - 1, 0, -1):
        if any(content.endswith(o[:k]) for o in openings if len(o) > k):
            before = content[:-k]
            return before[len(before.rstrip()):] + content[-k:]
    return ""


# --- render and tool_choice ------------------------------------------------------------------------------

def test_render_without_tools_and_with_auto_or_none(tokenizers):
    f = make_format("chatglm3", tokenizers)
    serving = ChatServing(f)
    plain = serving.render(MESSAGES)
    assert plain == ChatPrompt(f.render(MESSAGES), None, None)
    assert serving.stop_token_ids == f.stop_token_ids
    for choice in (None, "auto"):
        prompt = serving.render(MESSAGES, TOOLS, tool_choice=choice)
        assert prompt.prompt_ids == f.render(MESSAGES, tools=TOOLS) and prompt.structured is None
        assert prompt.tools == TOOLS
    none = serving.render(MESSAGES, TOOLS, tool_choice="none")  # the model is not shown the tools at all
    assert none == ChatPrompt(f.render(MESSAGES), None, None)
    assert serving.render(MESSAGES, [], tool_choice="none").tools is None


def test_render_forces_a_call_by_grammar_not_by_prompt(tokenizers):
    f = make_format("chatglm3", tokenizers)
    serving = ChatServing(f)
    prompt = serving.render(MESSAGES, TOOLS, tool_choice={"type": "function", "function": {"name": "search"}})
    assert prompt.tools == [TOOLS[1]]
    assert prompt.prompt_ids == f.render(MESSAGES, tools=[TOOLS[1]])  # nothing appended: the model writes it
    assert '"search\\n"' in prompt.structured.grammar and "get_weather" not in prompt.structured.grammar
    assert prompt.structured.source == "tool_choice"
    several = serving.render(MESSAGES, TOOLS, tool_choice="required")
    assert several.tools == TOOLS and "get_weather" in several.structured.grammar
    assert "search" in several.structured.grammar
    legacy = serving.render(MESSAGES, TOOLS, tool_choice="required", choice_field="function_call")
    assert legacy.structured.source == "function_call"


@pytest.mark.parametrize("tools, choice, field, words", [
    (None, "required", "tool_choice", "asks for a tool call but the request has no tools"),
    (None, {"type": "function", "function": {"name": "search"}}, "tool_choice", "no tools"),
    (TOOLS, {"type": "function", "function": {"name": "rm"}}, "tool_choice",
     "names the function 'rm', which is not in tools (get_weather, search)"),
    (TOOLS, "sometimes", "tool_choice", 'must be "none", "auto", "required"'),
    (TOOLS, {"type": "function", "function": "search"}, "tool_choice", "must be"),
    (TOOLS, {"type": "retrieval"}, "tool_choice", "must be"),
])
def test_render_tool_choice_errors_name_the_field(tokenizers, tools, choice, field, words):
    serving = ChatServing(make_format("glm4", tokenizers))
    with pytest.raises(InvalidParameterError) as e:
        serving.render(MESSAGES, tools, tool_choice=choice)
    assert e.value.field == field and words in str(e.value) and str(e.value).startswith(field)


def test_render_errors_use_the_legacy_field_name(tokenizers):
    serving = ChatServing(make_format("glm4", tokenizers))
    with pytest.raises(InvalidParameterError) as e:
        serving.render(MESSAGES, None, tool_choice="required", choice_field="function_call")
    assert e.value.field == "function_call" and "drop function_call" in str(e.value)
    with pytest.raises(InvalidParameterError) as e:
        serving.render(MESSAGES, TOOLS, tool_choice={"function": {"name": "x"}}, choice_field="function_call")
    assert e.value.field == "function_call" and "'x'" in str(e.value)


def test_render_tools_on_a_format_without_tools(tokenizers):
    serving = ChatServing(make_format("chatglm2", tokenizers))
    with pytest.raises(InvalidParameterError) as e:
        serving.render(MESSAGES, TOOLS)
    assert e.value.field == "tools"
    assert serving.render(MESSAGES, TOOLS, tool_choice="none").tools is None  # not shown: nothing to refuse


# --- sampling params ------------------------------------------------------------------------------------

def test_sampling_params_clamp_and_stop_ids(tokenizers):
    f = make_format("glm4", tokenizers)
    serving = ChatServing(f)
    params = SamplingParams(temperature=0.3, max_tokens=None, extra_stop_token_ids=[7])
    out = serving.sampling_params(params, ChatPrompt([1] * 100), max_model_len=1000)
    assert out.max_tokens == 900 and out.temperature == 0.3 and not out.skip_special_tokens
    assert out.extra_stop_token_ids == f.stop_token_ids + [7]
    assert params.max_tokens is None and params.skip_special_tokens  # a copy
    assert serving.sampling_params(SamplingParams(max_tokens=50), ChatPrompt([1] * 100), 1000).max_tokens == 50
    assert serving.sampling_params(SamplingParams(max_tokens=5000), ChatPrompt([1] * 100), 1000).max_tokens == 900
    assert serving.sampling_params(SamplingParams(), ChatPrompt([1] * 999), 1000).max_tokens == 1
    json_prompt = serving.render(MESSAGES, response_format={"type": "json_object"})
    assert serving.sampling_params(SamplingParams(), json_prompt, 1000).structured == json_prompt.structured


@pytest.mark.parametrize("num_prompt_tokens", [1000, 1200])
def test_sampling_params_without_room(tokenizers, num_prompt_tokens):
    serving = ChatServing(make_format("chatglm3", tokenizers))
    with pytest.raises(ContextLengthError) as e:
        serving.sampling_params(SamplingParams(max_tokens=10), ChatPrompt([1] * num_prompt_tokens), 1000)
    assert f"prompt has {num_prompt_tokens} tokens but the model accepts 1000 (max_model_len)" in str(e.value)


# --- streaming: plain answers ---------------------------------------------------------------------------

PLAIN_ANSWERS = [
    "  你好！我的知识截止到[[训练时间]]。龘靐齉 < [ ok\n\n第二段 end  ",
    "\n\n  leading and trailing whitespace \n\t ",
    "龘", "😀 é 齉", "纯中文回答，没有空格。", MARKER, "[[[训练时间]]] [[训 x [[", "ends with half a marker [[训练",
    "ends with half a tag <tool_c", "a < b and c <tool> d", "", "   ",
]


@pytest.mark.parametrize("name", list(FORMAT_TOKENIZER))
@pytest.mark.parametrize("answer", PLAIN_ANSWERS)
def test_stream_of_a_plain_answer_equals_the_parse(tokenizers, name, answer):
    f = make_format(name, tokenizers)
    serving = ChatServing(f)
    prompt = ChatPrompt([1, 2, 3])
    ids = answer_ids(f, answer)
    stream = serving.stream(prompt)
    deltas = feed(stream, ids)
    content = serving.parse(prompt, ids).content
    assert "".join(deltas) == content == stream.result.content
    # Before the end only a possible partial marker or tag was held, nothing else (trailing whitespace is
    # dropped by the final strip, so it never shows).
    openings = tuple(o for o, _ in f.replacements) + tuple(o for o, _ in f.hidden_spans)
    assert deltas[-1] == withheld_tail(content, openings)
    assert not any("\ufffd" in d for d in deltas)
    if f.replacements:
        assert not any("[[训" in d for d in deltas[:-1]) or "[[训" in answer.replace(MARKER, "")


def test_stream_feeds_chinese_as_it_arrives(tokenizers):
    f = make_format("chatglm2", tokenizers)
    stream = ChatServing(f).stream(ChatPrompt([]))
    shown = ""
    for token_id in f.tokenizer.encode("你好，龘靐。"):
        shown += stream.feed([token_id])
    assert shown == "你好，龘靐。"  # every character shows as soon as its last byte arrives


def test_segments_are_joined_and_split_on_ids(tokenizers):
    f = make_format("chatglm3", tokenizers)
    ids = answer_ids(f, "第一段。", "  ", "第二段 <|assistant|> 是文字。")
    stream = ChatServing(f).stream(ChatPrompt([]))
    deltas = feed(stream, ids)
    assert "".join(deltas) == "第一段。\n第二段 <|assistant|> 是文字。" == stream.result.content
    assert deltas[-1] == ""


def test_a_segment_without_its_metadata_line_stalls_until_the_end(tokenizers, sp):
    f = make_format("chatglm3", tokenizers)
    ids = sp.encode("abc") + [sp.special_id("<|assistant|>")] + sp.encode("\n") + sp.encode("hello")
    deltas = feed(ChatServing(f).stream(ChatPrompt([])), ids)
    assert deltas[:-1] == [""] * (len(deltas) - 1) and deltas[-1] == "abc\nhello"


# --- streaming: tool calls never show --------------------------------------------------------------------

def tool_stream(f, ids, tools=TOOLS):
    stream = ChatServing(f).stream(ChatPrompt([], tools))
    return stream, feed(stream, ids)


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_chatglm3_call_segment_never_shows(tokenizers, tools):
    f = make_format("chatglm3", tokenizers)
    ids = answer_ids(f, "我来查一下。", "```python\ntool_call(location='北京')\n```", metadata=("", "get_weather"))
    stream, deltas = tool_stream(f, ids, tools)
    assert "".join(deltas) == "我来查一下。" and "".join(deltas[:-1]) == "我来查一下。"
    assert [c.name for c in stream.result.tool_calls] == ["get_weather"]


def test_glm4_call_segment_and_server_rule_never_show(tokenizers):
    f = make_format("glm4", tokenizers)
    ids = answer_ids(f, "让我查一下。", '{"query": "天气"}', metadata=("", "search"))
    stream, deltas = tool_stream(f, ids)
    assert "".join(deltas) == "让我查一下。" and stream.result.tool_calls[0].name == "search"
    # GLM-4's server rule: no metadata, the first line a declared tool, then JSON. Held, then parsed.
    stream, deltas = tool_stream(f, answer_ids(f, 'search\n{"query": "GLM-4"}'))
    assert deltas == [""] * len(deltas) and stream.result.tool_calls[0].name == "search"
    # An answer that merely starts with a tool's name is text, shown as it streams.
    stream, deltas = tool_stream(f, answer_ids(f, "search engines are useful"))
    assert "".join(deltas[:-1]).startswith("search engines") and stream.result.tool_calls == []


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_hermes_block_never_shows(tokenizers, hf, tools):
    f = make_format("jinja", tokenizers)
    ids = hf.encode('先查一下。\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "上海"}}\n</tool_call>')
    stream, deltas = tool_stream(f, ids, tools)
    assert "".join(deltas) == "先查一下。" and not any("<" in d or "get_weather" in d for d in deltas)
    assert stream.result.tool_calls[0].name == "get_weather"
    ids = hf.encode('a <tool_call>\n{"name": "search", "arguments": {}}\n</tool_call> b')
    stream, deltas = tool_stream(f, ids, tools)
    assert "".join(deltas[:-1]) == "a  b" and stream.result.content == "a  b"


def test_unreadable_hermes_block_shows_once_closed(tokenizers, hf):
    """The parse keeps a block it cannot read as text; so does the display, as soon as the block closes."""
    f = make_format("jinja", tokenizers)
    text = "写法是 <tool_call>名字</tool_call> 这样。"
    stream, deltas = tool_stream(f, hf.encode(text), tools=None)
    assert "".join(deltas[:-1]) == text == stream.result.content and stream.result.tool_calls == []


def test_bare_json_call_is_held_only_with_tools(tokenizers, hf):
    f = make_format("jinja", tokenizers)
    text = '{"name": "get_weather", "arguments": {"city": "北京"}}'
    stream, deltas = tool_stream(f, hf.encode(text))
    assert deltas == [""] * len(deltas) and stream.result.tool_calls[0].name == "get_weather"
    stream, deltas = tool_stream(f, hf.encode(text), tools=None)
    assert "".join(deltas) == text and stream.result.tool_calls == []
    # With tools, a plain answer shows as it streams; one starting like JSON shows at the end.
    stream, deltas = tool_stream(f, hf.encode("Hello, how are you today?"))
    assert "".join(deltas[:-1]) == "Hello, how are you today?"
    stream, deltas = tool_stream(f, hf.encode("[1, 2] is a list"))
    assert deltas[:-1] == [""] * (len(deltas) - 1) and deltas[-1] == "[1, 2] is a list"


def test_a_forced_call_shows_nothing(tokenizers, sp):
    f = make_format("chatglm3", tokenizers)
    serving = ChatServing(f)
    prompt = serving.render(MESSAGES, TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    stream = serving.stream(prompt)
    deltas = feed(stream, answer_ids(f, "```python\ntool_call(location='北京')\n```", metadata=("get_weather",)))
    assert deltas == [""] * len(deltas)
    [call] = stream.result.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"location": "北京"}
    with pytest.raises(ValueError):
        stream.feed([1])


# --- properties: chunking does not matter ----------------------------------------------------------------

ALPHABET = [" ", "  ", "\n", "\n\n", "\t", "<", "{", "`", "[", "[[", "训练", "时间", "]]", MARKER, "<tool_call>",
            "</tool_call>", "你好", "龘", "靐", "😀", "é", "a", "ok", "end", "，"]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(FORMAT_TOKENIZER)), parts=st.lists(st.sampled_from(ALPHABET), max_size=25),
       sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6), with_tools=st.booleans())
def test_chunking_never_changes_the_display(tokenizers, name, parts, sizes, with_tools):
    f = make_format(name, tokenizers)
    tools = TOOLS if with_tools and f.supports_tools else None
    ids = answer_ids(f, "".join(parts))
    one, chunked = ChatServing(f).stream(ChatPrompt([], [], tools)), ChatServing(f).stream(ChatPrompt([], [], tools))
    by_one, by_chunks = feed(one, ids), feed(chunked, ids, tuple(sizes))
    assert "".join(by_one[:-1]) == "".join(by_chunks[:-1])  # the same shown before the end, too
    assert "".join(by_one) == "".join(by_chunks)
    if tools is None:
        assert "".join(by_one[:-1]) == display_text(f, ids)
        assert "".join(by_one) == display_text(f, ids, final=True) == f.parse(ids).content


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["chatglm3", "glm4"]),
       segments=st.lists(st.lists(st.sampled_from(ALPHABET), max_size=8), min_size=1, max_size=4),
       sizes=st.lists(st.integers(1, 7), min_size=1, max_size=6))
def test_chunking_never_changes_segmented_display(tokenizers, name, segments, sizes):
    f = make_format(name, tokenizers)
    ids = answer_ids(f, *("".join(s) for s in segments))
    by_one = feed(ChatServing(f).stream(ChatPrompt([])), ids)
    by_chunks = feed(ChatServing(f).stream(ChatPrompt([])), ids, tuple(sizes))
    assert "".join(by_one) == "".join(by_chunks) == display_text(f, ids, final=True) == f.parse(ids).content


def test_display_text_is_a_fresh_stream(tokenizers, sp):
    f = make_format("chatglm3", tokenizers)
    ids = answer_ids(f, "  我的知识截止到[[训练时间]]。  ")
    assert display_text(f, ids) == "我的知识截止到2023年。"
    assert display_text(f, ids[:-3]) == "我的知识截止到"


# --- linear work ------------------------------------------------------------------------------------------

class CountingTokenizer:
    """A tokenizer that records how many ids each decode call gets."""

    def __init__(self, tokenizer):
        self._tokenizer, self.sizes = tokenizer, []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


LONG_PARAGRAPH = ("你好，我是人工智能助手。我的知识截止到[[训练时间]]。龘靐齉 The quick brown fox jumps over the "
                  "lazy dog. 12345\n\n```python\nprint('hello world')\n```\n  < [ ok 😀 ")


@pytest.mark.parametrize("name, tools", [("chatglm2", None), ("chatglm3", TOOLS), ("glm4", TOOLS), ("jinja", None),
                                         ("jinja", TOOLS)])
def test_streaming_work_per_token_is_bounded(tokenizers, name, tools):
    f = make_format(name, tokenizers)
    text = LONG_PARAGRAPH
    while len(answer_ids(f, text)) < 4000:
        text += LONG_PARAGRAPH
    ids = answer_ids(f, text)[:4000]
    counter = CountingTokenizer(f.tokenizer)
    stream = ChatServing(make_format(name, {FORMAT_TOKENIZER[name]: counter})).stream(ChatPrompt([], [], tools))
    held_chars, held_ids, shown = 0, 0, []
    for token_id in ids:
        shown.append(stream.feed([token_id]))
        held_chars, held_ids = max(held_chars, stream.num_held_chars), max(held_ids, stream.num_held_ids)
    assert max(counter.sizes) <= 16, max(counter.sizes)   # never the whole output
    assert len(counter.sizes) <= 3 * len(ids)              # a bounded number of decodes per id
    assert held_chars <= 16 and held_ids <= MAX_HELD_IDS
    assert len("".join(shown)) > len(text) // 2            # and it did stream (nothing held back in bulk)
    shown.append(stream.feed([], finished=True))
    assert "".join(shown) == stream.result.content == f.parse(ids, tools).content


def test_invalid_bytes_are_held_only_briefly(sp):
    """A run of bytes that never completes a character is shown as U+FFFD, not held (and re-decoded)
    forever."""
    continuation = sp.sp.piece_to_id("<0x80>")
    ids = sp.encode("坏") + [continuation] * 200 + sp.encode("好")
    counter = CountingTokenizer(sp)
    decoder = TextDecoder(counter.decode)
    out = [decoder.add([i]) for i in ids] + [decoder.add([], final=True)]
    assert "".join(out) == sp.decode(ids)
    assert max(counter.sizes) <= 2 * MAX_HELD_IDS + 2


@pytest.mark.parametrize("name", ["chatglm3", "glm4", "jinja"])
def test_stop_strings_end_the_display_and_the_parse_inside_a_token(tokenizers, name):
    """The engine stops at a stop string found in text, which can end inside a token: the ids decode past it,
    so the display and the parse cut there themselves."""
    f = make_format(name, tokenizers)
    serving = ChatServing(f)
    prompt = serving.render(MESSAGES)
    serving.sampling_params(SamplingParams(stop=["lo wor", "zzz"]), prompt, 1000)
    ids = answer_ids(f, "hello world, hello")
    for sizes in ((1,), (3,), (len(ids),)):
        stream = serving.stream(prompt)
        deltas = feed(stream, ids, sizes)
        assert "".join(deltas) == "hel" == stream.result.content
        assert serving.parse(prompt, ids).content == "hel"
