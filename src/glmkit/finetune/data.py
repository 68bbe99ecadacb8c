"""Training data -> token ids + loss mask, rendered by the same chat formats as inference.

`read_conversations` reads .jsonl, or .json (a list, or JSON lines as ChatGLM3's demo names them), detecting each
record's format and mapping it onto OpenAI-shaped messages:
- ChatGLM3 finetune_demo `{"conversations": [{"role", "content"}], "tools"?}`: role `observation` -> `tool`; a
  `{"role": "tool", "name", "parameters", "observation"}` turn -> an assistant `tool_calls` entry (arguments =
  parameters as JSON) plus a tool message (the observation, JSON-dumped unless a string); an assistant turn with
  `metadata` (ChatGLM3 history) -> a call read from its body (`tool_call(...)` through `ast` literals, a JSON
  object, or the interpreter's code fence). `"loss": false` on an assistant turn is kept: no targets there. A
  system turn's `tools` stay on it (inference accepts that shape); top-level tools go to `Conversation.tools`.
- OpenAI `{"messages"}`; ShareGPT `{"conversations": [{"from", "value"}], "system"?}` (function_call values are
  JSON `{"name", "arguments"}` or lists of them); `tools` may be JSON text, as LLaMA-Factory writes it.
- Alpaca `{"instruction", "input"?, "output", "system"?, "history"?}`; ADGEN `{"content", "summary"}`.
A call turn right after an assistant text turn joins it (OpenAI's content + tool_calls), so the `<|assistant|>`
between thought and call is a target, as in ChatGLM3's demo. Calls are written back by the format (ChatGLM3:
`tool_call(k='v')` with repr quotes, as the demo's old astunparse preprocessing did). Nothing is ever evaluated.

`render_sample` finds targets by the prefix property: for assistant message i, P = render(messages[:i], with the
generation prompt) and F = render(messages[:i+1]); F[len(P):] is that turn's span in the one full rendering. No
per-format code and no template markup is needed (HF's `{% generation %}` blocks are missing from most templates,
the ChatGLM/GLM-4 ones included), and each turn is trained in exactly the text inference writes for it. A span
holding no stop id also makes the next token a target when it is one (ChatGLM3's next `<|user|>`/`<|observation|>`),
and gets `stop_token_ids[0]` appended with loss when it ends the conversation. That reproduces ChatGLM3
finetune_hf.py `process_batch` (eos appended, per-message mask shifted right by one: each assistant message minus
its `<|assistant|>` id, plus the token after it), except that it also trains the observation turns and we train
assistant turns only. A format whose history rendering is not a prefix of the whole (ChatGLM2 moves the system
text to the last query; reasoning templates drop earlier thinking) is refused, not guessed around. Knows nothing
of models, devices or the trainer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..chat.messages import normalize_messages, normalize_tools
from ..chat.tool_calls import fenced_body, parse_json_tool_call, parse_python_tool_call
from ..errors import GlmkitError, InvalidParameterError, excerpt

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "observation": "tool",
              "function": "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function": "tool"}
_SEPARATORS = re.compile(r"[ \t\r\n,]*")  # between the elements of a JSON list
FORMATS_HINT = ('{"conversations": [{"role", "content"}]}, {"messages": [...]}, {"conversations": [{"from", '
                '"value"}]}, {"instruction", "output"} or {"content", "summary"}')


class DataError(GlmkitError, ValueError):
    """A training record (or file) that cannot be used; the message names file:line, the field and the fix."""

    def __init__(self, source: str, field: str, message: str):
        super().__init__(f"{source}: {field}: {message}")
        self.source, self.field = source, field


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None
    source: str
    character: dict | None = None  # CharacterGLM profile, from a record's "character" object


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[bool]  # True where input_ids[t] is a target, predicted from positions < t
    source: str


@dataclass
class PackedSample:
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # each packed sample's length, in order


@dataclass
class DataStats:
    num_records: int = 0
    num_tokens: int = 0          # in the samples returned (after truncation)
    num_target_tokens: int = 0
    num_truncated: int = 0       # cut to max_length (a dropped one counts here and in num_empty)
    num_empty: int = 0           # no target left: dropped


# -- reading ---------------------------------------------------------------------------------------------
def _records(path: Path):
    """(line number, parsed record) for each record: JSON lines, or a JSON list (line of each element)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), "file", f"cannot be read ({e}); pass a UTF-8 .jsonl or .json file")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        decoder, pos = json.JSONDecoder(), text.index("[") + 1
        line = 1 + text.count("\n", 0, pos)
        while True:
            start = _SEPARATORS.match(text, pos).end()
            line += text.count("\n", pos, start)
            if start >= len(text):
                raise DataError(f"{path}:{line}", "file", "ends inside the JSON list; close it with ]")
            if text[start] == "]":
                return
            try:
                record, end = decoder.raw_decode(text, start)
            except ValueError as e:
                raise DataError(f"{path}:{line}", "record", f"is not valid JSON ({e.msg}); fix the JSON there")
            yield line, record
            line, pos = line + text.count("\n", start, end), end
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and the like raw, which splitlines breaks on.
    for line, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():
            try:
                yield line, json.loads(raw)
            except ValueError as e:
                raise DataError(f"{path}:{line}", "record", f"is not valid JSON ({e}); each line of a JSON-lines "
                                "file must be one whole record")


def read_conversations(path) -> list[Conversation]:
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(str(path), "file", "must be .jsonl (one record per line) or .json (a list of records)")
    out = [_conversation(record, f"{path}:{line}") for line, record in _records(path)]
    if not out:
        raise DataError(str(path), "file", "holds no records; give a file with at least one conversation")
    return out


def _conversation(record, source: str) -> Conversation:
    if not isinstance(record, Mapping):
        raise DataError(source, "record", f"must be a JSON object, got {type(record).__name__}: {FORMATS_HINT}")
    turns = record.get("conversations", record.get("messages"))
    key = "conversations" if "conversations" in record else "messages"
    if turns is not None:
        if not isinstance(turns, list) or not turns:
            raise DataError(source, key, "must be a non-empty list of turns")
        sharegpt = isinstance(turns[0], Mapping) and "from" in turns[0]
        messages = _sharegpt(turns, record, key, source) if sharegpt else _chat_turns(turns, key, source)
    elif "instruction" in record and "output" in record:
        messages = _alpaca(record, source)
    elif "content" in record and "summary" in record:
        messages = [{"role": "user", "content": _text(record, "content", source)},
                    {"role": "assistant", "content": _text(record, "summary", source)}]
    else:
        raise DataError(source, "record", f"fits no known format (keys {excerpt(sorted(record))}); use {FORMATS_HINT}")
    tools = record.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory writes the tools list as JSON text
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            raise DataError(source, "tools", f"{excerpt(tools)} is a string but not JSON; give a list of tools")
    try:
        tools = normalize_tools(tools)
    except InvalidParameterError as e:
        raise _wrapped(source, e, e.field)
    character = record.get("character")
    if character is not None and not isinstance(character, Mapping):
        raise DataError(source, "character", 'must be an object {"bot_name", "bot_info", ...}')
    return Conversation(_checked(messages, key, source), tools, source, character)


def _wrapped(source: str, error: InvalidParameterError, field: str) -> DataError:
    """A validator's error about one message or the tools, renamed to the record's own field."""
    return DataError(source, field, str(error)[len(error.field) + 1:])  # str(error) is "field=value: why"


def _text(obj: Mapping, key: str, source: str, where: str = "") -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        problem = "is missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise DataError(source, where + key, f"{problem}; give the text of this turn")
    return value


def _chat_turns(turns: list, key: str, source: str) -> list[dict]:
    """ChatGLM3-demo or OpenAI turns -> OpenAI messages."""
    messages = []
    for j, turn in enumerate(turns):
        where = f"{key}[{j}]."
        if not isinstance(turn, Mapping) or turn.get("role") not in CHAT_ROLES:
            role = turn.get("role") if isinstance(turn, Mapping) else turn
            raise DataError(source, where + "role", f"{excerpt(role)} is not one of {', '.join(CHAT_ROLES)}")
        message = {k: v for k, v in turn.items() if k not in ("role", "metadata", "parameters", "observation")}
        message["role"] = CHAT_ROLES[turn["role"]]
        if not isinstance(turn.get("loss", True), bool):
            raise DataError(source, where + "loss", f"{excerpt(turn['loss'])} must be true or false")
        if turn["role"] == "tool" and "parameters" in turn:  # the ChatGLM3 demo's call + result in one turn
            if not isinstance(turn.get("name"), str) or not isinstance(turn["parameters"], Mapping):
                raise DataError(source, where + "parameters", 'a tool turn needs "name" (str) and "parameters" '
                                '(object), e.g. {"role": "tool", "name": "f", "parameters": {}, "observation": ""}')
            observation = turn.get("observation", "")
            call = {"type": "function", "function": {"name": turn["name"],
                                                     "arguments": json.dumps(turn["parameters"], ensure_ascii=False)}}
            _add_call(messages, call, turn.get("loss", True))
            messages.append({"role": "tool", "content": observation if isinstance(observation, str)
                             else json.dumps(observation, ensure_ascii=False)})
            continue
        if message["role"] == "assistant" and turn.get("metadata"):  # ChatGLM3 history: the call is in the body
            call = _metadata_call(turn, where, source)
            _add_call(messages, {"type": "function", "function": call}, turn.get("loss", True))
            continue
        calls = turn.get("tool_calls") or turn.get("function_call")
        if "content" not in turn and not (message["role"] == "assistant" and calls):
            raise DataError(source, where + "content", "is missing; give the text of this turn")
        messages.append(message)
    return messages


def _metadata_call(turn: Mapping, where: str, source: str) -> dict:
    name = turn["metadata"]
    if not isinstance(name, str):
        raise DataError(source, where + "metadata", "must be a string (the tool name)")
    body = _text(turn, "content", source, where)
    call = parse_python_tool_call(name, body) or parse_json_tool_call(name, body)
    if call is None and name == "interpreter":
        code = fenced_body(body)
        return {"name": name, "arguments": json.dumps({"code": (body if code is None else code).strip()})}
    if call is None:
        raise DataError(source, where + "content", f"{excerpt(body)} is not a call to {name!r}; write it as "
                        "```python\\ntool_call(arg=...)\\n``` or a JSON object of the arguments")
    return {"name": call.name, "arguments": call.arguments}


def _add_call(messages: list[dict], call: dict, loss) -> None:
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
        last["tool_calls"] = [call]  # thought + call: one assistant message, as OpenAI shapes it
        if loss is not False:
            last.pop("loss", None)  # learnt unless both parts say loss: false
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]}
                        | ({"loss": False} if loss is False else {}))


def _sharegpt(turns: list, record: Mapping, key: str, source: str) -> list[dict]:
    messages = [{"role": "system", "content": _text(record, "system", source)}] if record.get("system") else []
    for j, turn in enumerate(turns):
        where = f"{key}[{j}]."
        if not isinstance(turn, Mapping) or turn.get("from") not in (*SHAREGPT_ROLES, "function_call"):
            role = turn.get("from") if isinstance(turn, Mapping) else turn
            raise DataError(source, where + "from", f"{excerpt(role)} is not one of "
                            f"{', '.join(SHAREGPT_ROLES)}, function_call")
        value = _text(turn, "value", source, where)
        if turn["from"] != "function_call":
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": value})
            continue
        try:
            calls = json.loads(value)
        except ValueError:
            calls = None
        for call in calls if isinstance(calls, list) else [calls]:
            if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
                raise DataError(source, where + "value", f'{excerpt(value)} must be JSON {{"name": ..., '
                                '"arguments": {...}} (or a list of them)')
            _add_call(messages, {"type": "function", "function": {"name": call["name"],
                                                                  "arguments": call.get("arguments")}}, True)
    return messages


def _alpaca(record: Mapping, source: str) -> list[dict]:
    messages = [{"role": "system", "content": _text(record, "system", source)}] if record.get("system") else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(source, "history", "must be a list of [question, answer] pairs")
    for j, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(source, f"history[{j}]", f"{excerpt(pair)} must be a [question, answer] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = _text(record, "instruction", source)
    if record.get("input"):
        query += "\n" + _text(record, "input", source)
    answer = _text(record, "output", source)
    return messages + [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]


def _checked(messages: list[dict], key: str, source: str) -> list[dict]:
    """Give tool calls stable ids (a template may print them; random ones would differ between the prefix
    renderings), link tool results to them, and validate each message as inference would."""
    pending, num_calls = [], 0
    for j, message in enumerate(messages):
        function_call = message.pop("function_call", None)  # the older single-call shape (tool_calls win)
        if function_call is not None and not message.get("tool_calls"):
            message["tool_calls"] = [{"type": "function", "function": function_call}]
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and not call.get("id"):
                call["id"] = f"call_{num_calls}"
            num_calls += 1
        if message.get("tool_calls"):
            pending = [c.get("id") for c in message["tool_calls"] if isinstance(c, dict)]
        elif message["role"] == "tool" and pending and "tool_call_id" not in message:
            message["tool_call_id"] = pending.pop(0)
        try:
            normalized = normalize_messages([message])[0]
        except InvalidParameterError as e:
            raise _wrapped(source, e, e.field.replace("messages[0]", f"{key}[{j}]", 1))
        if "tool_calls" in normalized:  # arguments as JSON text
            message["tool_calls"] = normalized["tool_calls"]
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(source, key, "has no assistant turn, so nothing to learn; add the answer to train on")
    if roles[0] == "assistant":
        raise DataError(source, f"{key}[0]", "is an assistant turn with nothing before it; start with a user turn")
    if roles[-1] != "assistant":
        raise DataError(source, f"{key}[{len(roles) - 1}]", f"is a {roles[-1]} turn; the last turn must be the "
                        "assistant's answer (drop the trailing turns or add the answer)")
    return messages


# -- rendering -------------------------------------------------------------------------------------------
def render_sample(chat_format, conversation: Conversation) -> Sample:
    messages, source = conversation.messages, conversation.source

    def render(msgs, add_generation_prompt):
        try:
            return chat_format.render(msgs, tools=conversation.tools, character=conversation.character,
                                      add_generation_prompt=add_generation_prompt)
        except GlmkitError as e:
            raise DataError(source, "messages", f"the {chat_format.name} chat format cannot render them: {e}")

    full = render(messages, False)
    mask = [False] * len(full)
    stops = set(chat_format.stop_token_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("loss") is False:
            continue
        if i == 0:
            raise DataError(source, "messages[0]", "an assistant turn needs a turn before it to answer")
        prefix, upto = render(messages[:i], True), render(messages[:i + 1], False)
        if not (len(prefix) < len(upto) and full[:len(upto)] == upto and upto[:len(prefix)] == prefix):
            raise DataError(source, f"messages[{i}]", f"the {chat_format.name} format's rendering of the turns "
                            "before this answer is not a prefix of the whole conversation's (its template rewrites "
                            "history, or the answer is empty); train with a format that keeps history as is")
        mask[len(prefix):len(upto)] = [True] * (len(upto) - len(prefix))
        if stops.isdisjoint(upto[len(prefix):]):  # the span itself does not teach stopping
            if len(upto) < len(full) and full[len(upto)] in stops:
                mask[len(upto)] = True
            elif len(upto) == len(full):
                full, mask = full + [chat_format.stop_token_ids[0]], mask + [True]
    return Sample(full, mask, source)


def load_samples(path, chat_format, max_length: int) -> tuple[list[Sample], DataStats]:
    if not isinstance(max_length, int) or max_length < 2:
        raise InvalidParameterError("max_length", max_length, "must be an integer >= 2 (tokens per sample)")
    stats, samples = DataStats(), []
    for conversation in read_conversations(path):
        stats.num_records += 1
        sample = render_sample(chat_format, conversation)
        if len(sample.input_ids) > max_length:
            stats.num_truncated += 1
            sample = Sample(sample.input_ids[:max_length], sample.loss_mask[:max_length], sample.source)
        if not any(sample.loss_mask):
            stats.num_empty += 1
            continue
        stats.num_tokens += len(sample.input_ids)
        stats.num_target_tokens += sum(sample.loss_mask)
        samples.append(sample)
    return samples, stats


def pack(samples: list[Sample], max_length: int) -> list[PackedSample]:
    """First-fit: each sample, in order, goes into the first sequence with room for it. A max-tree over the
    free space of every possible sequence (unopened ones have all of it) finds that sequence in O(log n)."""
    size = 1
    while size < len(samples):
        size *= 2
    free = [max_length] * (2 * size)  # node k: the most free tokens below it; leaf k: sequence k - size
    packed: list[PackedSample] = []
    for sample in samples:
        n = len(sample.input_ids)
        if n > max_length:
            raise DataError(sample.source, "input_ids", f"has {n} tokens, more than max_length={max_length}; "
                            "truncate first (load_samples does)")
        k = 1
        while k < size:
            k = 2 * k if free[2 * k] >= n else 2 * k + 1
        if k - size == len(packed):
            packed.append(PackedSample())
        target = packed[k - size]
        target.input_ids += sample.input_ids
        target.loss_mask += sample.loss_mask
        target.lengths.append(n)
        free[k] -= n
        while k > 1:
            k //= 2
            free[k] = max(free[2 * k], free[2 * k + 1])
    return packed
