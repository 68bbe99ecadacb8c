"""Fine-tuning data: each input format read into OpenAI-shaped conversations, rendered by the inference chat
formats with a loss mask (ChatGLM3 checked against the official finetune_demo's labels), truncation, packing,
and bad records named by file:line and field. Uses the tiny tokenizers from conftest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from glmkit.chat import get_chat_format
from glmkit.finetune.data import (Conversation, DataError, DataStats, Sample, load_samples, pack,
                                  read_conversations, render_sample)

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气", "parameters": CITY}}]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]

# Qwen2.5-style template with tools, written for these tests (the structure Qwen2.5 ships).
QWEN_TOOLS_TEMPLATE = r"""
{%- if tools %}{{- '<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n<tools>' }}
    {%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for call in message.tool_calls %}
            {{- '\n<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' + (call.function.arguments | tojson) + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


GOLDEN = Path(__file__).parent / "golden" / "finetune"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("GLMKIT_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def marked(tokenizer, sample: Sample) -> str:
    """The sample's text with each run of targets in ⟦ ⟧ (for golden files a reviewer can read)."""
    runs, text = [], []
    for token_id, is_target in zip(sample.input_ids, sample.loss_mask):
        if runs and runs[-1][0] == is_target:
            runs[-1][1].append(token_id)
        else:
            runs.append((is_target, [token_id]))
    for is_target, ids in runs:
        piece = tokenizer.decode(ids, skip_special_tokens=False)
        if ids[-1] == tokenizer.eos_token_id and not tokenizer.decode(ids[-1:], skip_special_tokens=False):
            piece += "</s>"  # SentencePiece decodes its eos to nothing
        text.append(f"⟦{piece}⟧" if is_target else piece)
    return "".join(text)


def fmt(name, tokenizer, **kwargs):
    return get_chat_format(name, tokenizer=tokenizer, model_type="test", **kwargs)


def write(tmp_path, records, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return str(path)


def targets(sample: Sample) -> list[list[int]]:
    """The runs of consecutive target ids."""
    runs, run = [], []
    for token_id, is_target in zip(sample.input_ids, sample.loss_mask):
        if is_target:
            run.append(token_id)
        elif run:
            runs, run = runs + [run], []
    return runs + [run] if run else runs


# -- reading each format ---------------------------------------------------------------------------------
def test_chatglm3_demo_with_tools_and_observations(tmp_path):
    record = {"tools": TOOLS, "conversations": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "content": "我来查一下。"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 22}},
        {"role": "assistant", "content": "22 度。"},
        {"role": "user", "content": "上海呢"},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='上海')\n```"},
        {"role": "observation", "content": "25"},
        {"role": "assistant", "content": "25 度。", "loss": False},
        {"role": "user", "content": "算一下"},
        {"role": "assistant", "metadata": "interpreter", "content": "```python\nprint(1 + 1)\n```"},
        {"role": "observation", "content": "2"},
        {"role": "assistant", "content": "是 2。"}]}
    [conv] = read_conversations(write(tmp_path, ["", record]))
    assert conv.source == f"{tmp_path / 'data.jsonl'}:2" and conv.tools == TOOLS
    call = lambda i, name, args: {"id": f"call_{i}", "type": "function",  # noqa: E731
                                  "function": {"name": name, "arguments": args}}
    assert conv.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "北京天气"},
        {"role": "assistant", "content": "我来查一下。", "tool_calls": [call(0, "get_weather", '{"city": "北京"}')]},
        {"role": "tool", "content": '{"temp": 22}', "tool_call_id": "call_0"},
        {"role": "assistant", "content": "22 度。"}, {"role": "user", "content": "上海呢"},
        {"role": "assistant", "content": None, "tool_calls": [call(1, "get_weather", '{"city": "上海"}')]},
        {"role": "tool", "content": "25", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "25 度。", "loss": False}, {"role": "user", "content": "算一下"},
        {"role": "assistant", "content": None, "tool_calls": [call(2, "interpreter", '{"code": "print(1 + 1)"}')]},
        {"role": "tool", "content": "2", "tool_call_id": "call_2"},
        {"role": "assistant", "content": "是 2。"}]


def test_openai_messages_with_tool_calls(tmp_path):
    messages = [{"role": "user", "content": "北京天气"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "晴"},
                {"role": "assistant", "content": "晴天。"}]
    [conv] = read_conversations(write(tmp_path, [{"messages": messages, "tools": json.dumps(TOOLS)}]))
    assert conv.messages == messages and conv.tools == TOOLS
    # the older single-call shape becomes tool_calls; GLM-4's history shape (metadata + JSON body) too
    older = [messages[0], {"role": "assistant", "function_call": {"name": "get_weather", "arguments": {"city": "北京"}}},
             {"role": "function", "name": "get_weather", "content": "晴"}, messages[3]]
    glm4 = [messages[0], {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
            {"role": "observation", "content": "晴"}, messages[3]]
    for conv in read_conversations(write(tmp_path, [{"messages": older}, {"conversations": glm4}])):
        assert conv.messages[1]["tool_calls"] == [CALL | {"id": "call_0"}] and "function_call" not in conv.messages[1]
        assert conv.messages[2]["role"] == "tool" and conv.messages[2]["tool_call_id"] == "call_0"


def test_sharegpt(tmp_path):
    record = {"system": "Be brief.", "tools": json.dumps(TOOLS), "conversations": [
        {"from": "human", "value": "北京天气"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
        {"from": "observation", "value": "晴"}, {"from": "gpt", "value": "晴天。"}]}
    [conv] = read_conversations(write(tmp_path, [record]))
    assert conv.tools == TOOLS
    assert conv.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "北京天气"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "content": "晴", "tool_call_id": "call_0"}, {"role": "assistant", "content": "晴天。"}]


def test_alpaca_with_input_history_and_adgen(tmp_path):
    alpaca = {"system": "S", "history": [["q1", "a1"]], "instruction": "Translate", "input": "你好", "output": "Hello"}
    plain = {"instruction": "Say hi", "input": "", "output": "hi"}
    adgen = {"content": "类型#裙*裙长#半身裙", "summary": "这是一条裙子。"}
    a, p, g = read_conversations(write(tmp_path, [alpaca, plain, adgen]))
    assert a.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                          {"role": "assistant", "content": "a1"}, {"role": "user", "content": "Translate\n你好"},
                          {"role": "assistant", "content": "Hello"}]
    assert p.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]
    assert g.messages == [{"role": "user", "content": adgen["content"]},
                          {"role": "assistant", "content": adgen["summary"]}]
    assert a.tools is None and g.source.endswith("data.jsonl:3")


def test_json_list_and_json_lines_named_json(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text('[\n  {"messages": %s},\n\n  {"content": "a",\n   "summary": "b"}\n]\n' % json.dumps(HELLO))
    assert [c.source.rsplit(":", 1)[1] for c in read_conversations(listed)] == ["2", "4"]
    # ChatGLM3's finetune_demo names JSON-lines files .json
    lines = write(tmp_path, [{"messages": HELLO}] * 2, name="train.json")
    assert [c.source.rsplit(":", 1)[1] for c in read_conversations(lines)] == ["1", "2"]


# -- rendering: the same ids as inference, targets = the assistant turns -----------------------------------
def official_chatglm3_labels(sp, conversation: list[dict]) -> tuple[list[int], list[bool]]:
    """ChatGLM3 finetune_hf.py `process_batch` (spec 2.9), rewritten here as the reference: per message
    <|role|> + encode("\\n") + encode(content), eos; loss on non-system/user messages, shifted right by one."""
    ids, mask = [sp.special_id("[gMASK]"), sp.special_id("sop")], [False, False]
    for m in conversation:
        message = [sp.special_id(f"<|{m['role']}|>")] + sp.encode("\n") + sp.encode(m["content"])
        ids += message
        mask += [m["role"] not in ("system", "user")] * len(message)
    return ids + [sp.eos_token_id], [False] + mask


def test_chatglm3_ids_match_inference_and_official_demo(sp):
    f = fmt("chatglm3", sp)
    sample = render_sample(f, Conversation(HELLO, None, "x:1"))
    assert sample.input_ids == f.render(HELLO, add_generation_prompt=False) + [sp.eos_token_id]
    [run] = targets(sample)
    assert sp.decode(run[:-1], skip_special_tokens=False) == "\n Hello there"  # SentencePiece's dummy prefix
    assert run[-1] == sp.eos_token_id == f.stop_token_ids[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "晚上睡不着应该怎么办"},
                {"role": "assistant", "content": "Hello there"}]
    sample = render_sample(f, Conversation(messages, None, "x:1"))
    assert (sample.input_ids, sample.loss_mask) == official_chatglm3_labels(sp, messages)
    assert [sp.decode(r, skip_special_tokens=False) for r in targets(sample)] == ["\n 你好！<|user|>",
                                                                                   "\n Hello there"]


def test_chatglm3_tool_turns_are_learnt_as_emitted(tmp_path, sp):
    record = {"tools": TOOLS, "conversations": [
        {"role": "user", "content": "北京天气"}, {"role": "assistant", "content": "我来查一下。"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "晴"},
        {"role": "assistant", "content": "晴天。"}]}
    [conv] = read_conversations(write(tmp_path, [record]))
    f = fmt("chatglm3", sp)
    sample = render_sample(f, conv)
    assert sample.input_ids == f.render(conv.messages, tools=TOOLS, add_generation_prompt=False) + [2]
    s, e = sp.special_id, sp.encode
    thought_and_call = (e("\n") + e("我来查一下。") + [s("<|assistant|>")] + e("get_weather\n")
                        + e("```python\ntool_call(city='北京')\n```") + [s("<|observation|>")])
    assert targets(sample) == [thought_and_call, e("\n") + e("晴天。") + [2]]
    check_golden("chatglm3_tools.txt", marked(sp, sample))


def test_qwen_jinja_ids_match_inference(hf):
    f = fmt("jinja", hf)
    sample = render_sample(f, Conversation(HELLO, None, "x:1"))
    assert sample.input_ids == f.render(HELLO, add_generation_prompt=False)  # ends in <|im_end|>: no eos added
    assert [hf.decode(r, skip_special_tokens=False) for r in targets(sample)] == ["Hello there<|im_end|>\n"]


def test_qwen_tool_calls_and_loss_false(hf):
    f = fmt("jinja", hf, template=QWEN_TOOLS_TEMPLATE)
    messages = [{"role": "user", "content": "北京天气"},
                {"role": "assistant", "content": "", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "晴"},
                {"role": "assistant", "content": "skip me", "loss": False},
                {"role": "user", "content": "谢谢"}, {"role": "assistant", "content": "不客气"}]
    sample = render_sample(f, Conversation(messages, TOOLS, "x:1"))
    assert sample.input_ids == f.render(messages, tools=TOOLS, add_generation_prompt=False)
    assert [hf.decode(r, skip_special_tokens=False) for r in targets(sample)] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>\n',
        "不客气<|im_end|>\n"]
    check_golden("qwen_tools.txt", marked(hf, sample))


def test_characterglm_profile_from_the_record(tmp_path, sp):
    record = {"character": {"bot_name": "苏梦远", "bot_info": "作家"}, "messages": HELLO}
    [conv] = read_conversations(write(tmp_path, [record]))
    sample = render_sample(fmt("characterglm", sp), conv)
    assert sample.input_ids[:-1] == fmt("characterglm", sp).render(HELLO, character=record["character"],
                                                                   add_generation_prompt=False)
    assert [sp.decode(r) for r in targets(sample)] == ["Hello there"] and sample.input_ids[-1] == sp.eos_token_id


def test_glm4_and_chatglm2_targets(g4, sp):
    sample = render_sample(fmt("glm4", g4), Conversation(HELLO, None, "x:1"))
    assert [g4.decode(r, skip_special_tokens=False) for r in targets(sample)] == ["\nHello there<|endoftext|>"]
    sample = render_sample(fmt("chatglm2", sp), Conversation(HELLO * 2, None, "x:1"))
    assert [sp.decode(r) for r in targets(sample)] == ["Hello there", "Hello there"]
    assert sample.input_ids[-1] == sp.eos_token_id and sample.loss_mask[-1]


def test_history_rewriting_template_is_refused(hf, sp):
    # Earlier assistant turns are shortened (as reasoning models' templates drop their thinking).
    rewriting = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}{%- if m.role == 'assistant' and "
                 "not loop.last %}{{- m.content[:2] }}{%- else %}{{- m.content }}{%- endif %}{{- '<|im_end|>\\n' }}"
                 "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    with pytest.raises(DataError, match=r"x:7: messages\[1\]: .*rewrites history"):
        render_sample(fmt("jinja", hf, template=rewriting), Conversation(HELLO * 2, None, "x:7"))
    # ChatGLM2 moves the system text to the last query, so multi-turn history with a system message changes too.
    with pytest.raises(DataError, match="rewrites history"):
        render_sample(fmt("chatglm2", sp), Conversation([{"role": "system", "content": "S"}] + HELLO * 2, None, "x:1"))


# -- loading, truncation, packing ------------------------------------------------------------------------
def test_load_samples_truncates_and_drops_empty(tmp_path, sp):
    f = fmt("chatglm3", sp)
    long_question = {"messages": [{"role": "user", "content": "晚上睡不着应该怎么办" * 20},
                                  {"role": "assistant", "content": "Hello"}]}
    path = write(tmp_path, [{"messages": HELLO}, {"messages": HELLO * 3}, long_question])
    full = [render_sample(f, c) for c in read_conversations(path)]
    max_length = len(full[1].input_ids) - 3
    assert len(full[0].input_ids) < max_length < len(full[2].input_ids) - 10  # the long one's answer is cut off
    samples, stats = load_samples(path, f, max_length)
    assert [s.source[-1] for s in samples] == ["1", "2"]
    assert samples[0] == full[0]
    assert samples[1] == Sample(full[1].input_ids[:max_length], full[1].loss_mask[:max_length], full[1].source)
    assert stats == DataStats(num_records=3, num_tokens=len(full[0].input_ids) + max_length,
                              num_target_tokens=sum(full[0].loss_mask) + sum(full[1].loss_mask[:max_length]),
                              num_truncated=2, num_empty=1)
    with pytest.raises(Exception, match="max_length"):
        load_samples(path, f, 0)


def test_pack_first_fit_keeps_order_and_lengths():
    samples = [Sample(list(range(n)), [True] * n, f"s{n}") for n in (6, 5, 3, 2, 4, 1)]
    packed = pack(samples, max_length=8)
    assert [p.lengths for p in packed] == [[6, 2], [5, 3], [4, 1]]
    assert packed[0].input_ids == list(range(6)) + list(range(2)) and len(packed[0].loss_mask) == 8
    assert pack([], 8) == []
    with pytest.raises(DataError, match="s6: input_ids: has 6 tokens, more than max_length=5"):
        pack(samples, max_length=5)


# -- bad records -----------------------------------------------------------------------------------------
BAD_RECORDS = [
    ('["not", "an object"]', "record", "must be a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}', "record", "not valid JSON"),
    ({"prompt": "a", "response": "b"}, "record", "fits no known format"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, r"messages\[0\]\.content", "missing"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\]\.role", "not one of"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     r"messages\[0\]\.content", "must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": HELLO + [{"role": "user", "content": "more"}]}, r"messages\[2\]", "last turn must be the assistant"),
    ({"messages": HELLO, "tools": "[{not json"}, "tools", "not JSON"),
    ({"messages": HELLO, "tools": [{"type": "retrieval"}]}, r"tools\[0\]\.type", "only \"function\" tools"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ["a"]}]},
     r"conversations\[1\]\.value", "must be a string"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "get_weather()"}]},
     r"conversations\[1\]\.value", "must be JSON"),
    ({"conversations": [{"role": "user", "content": "hi"}, {"role": "tool", "name": "f", "parameters": "x=1"}]},
     r"conversations\[1\]\.parameters", "needs"),
    ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "loss": "no"}]},
     r"conversations\[1\]\.loss", "true or false"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, r"history\[0\]", "pair"),
    ({"content": "q", "summary": None}, "summary", "missing"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments", "JSON object"),
]


@pytest.mark.parametrize("record,field,problem", BAD_RECORDS)
def test_bad_records_name_file_line_and_field(tmp_path, record, field, problem):
    path = write(tmp_path, [{"messages": HELLO}, "", record])
    with pytest.raises(DataError, match=rf"data\.jsonl:3: {field}: .*{problem}") as info:
        read_conversations(path)
    assert info.value.source.endswith("data.jsonl:3")


def test_bad_files(tmp_path):
    for name, text, problem in (("empty.jsonl", "\n\n", "no records"), ("data.csv", "a,b\n", r"\.jsonl"),
                                ("open.json", '[{"messages": []}', "non-empty"), ("cut.json", "[\n", "close it")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=problem):
            read_conversations(tmp_path / name)


def test_records_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    evil_call = {"role": "assistant", "metadata": "get_weather", "content": f"```python\ntool_call(city={code})\n```"}
    with pytest.raises(DataError, match=r"conversations\[1\]\.content: .*is not a call"):
        read_conversations(write(tmp_path, [{"conversations": [{"role": "user", "content": "hi"}, evil_call]}]))
    [conv] = read_conversations(write(tmp_path, [{"messages": [{"role": "user", "content": code},
                                                               {"role": "assistant", "content": code}]}]))
    assert conv.messages[1]["content"] == code and not marker.exists()
