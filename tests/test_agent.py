"""The agent loop (tools/agent.py) driven by scripted model outputs in every chat format: each round's output
ids go through the format's real display and parse (ChatServing), the calls run through the real registry (and
one real kernel), and the observations must reach the next round's prompt in the format's own observation turn.
Then the in-process path (LocalBackend over an LLM whose engine replays scripted ids), hostile call text, the
terminal's display of a tool turn, and end to end with the real default model (slow).
"""

from __future__ import annotations

import io
import json
import os
import subprocess

import pytest

from tokenizer_fixtures import QWEN_TEMPLATE

from glmkit import LLM
from glmkit.chat import ChatServing, get_chat_format
from glmkit.engine.outputs import Delta
from glmkit.tools.agent import Agent, AgentError, Final, TextDelta, ToolFinished, ToolStarted
from glmkit.tools.builtins import calculator
from glmkit.tools.registry import tool
from glmkit.ui.backends import Chunk, LocalBackend

HERMES_TEMPLATE = QWEN_TEMPLATE + "{#- tools: calls are written as <tool_call> blocks -#}"
QUESTION = [{"role": "user", "content": "北京天气怎么样？"}]


@tool
def get_weather(city: str) -> dict:
    """Current weather of a city."""
    return {"city": city, "weather": "晴", "temperature_c": 22}


class ScriptedBackend:
    """A Backend whose model writes the scripted ids, round after round, through the format's real display and
    parse; it keeps each round's rendered prompt (decoded, special tokens shown)."""
    name, max_model_len, interruptible = "scripted", None, False

    def __init__(self, chat_format, outputs: list[list[int] | tuple[list[int], str]]):
        """`outputs`: each round's ids, or (ids, finish_reason) for a round that does not end in "stop"."""
        self.serving, self.outputs, self.prompts, self.offered = ChatServing(chat_format), list(outputs), [], []

    def count_tokens(self, messages):
        return None

    def stream(self, messages, settings, tools=None, tool_choice=None):
        prompt = self.serving.render(messages, tools, None, tool_choice)
        self.offered.append([t["function"]["name"] for t in tools or []])
        tokenizer = self.serving.chat_format.tokenizer
        self.prompts.append(tokenizer.decode(prompt.prompt_ids, skip_special_tokens=False))
        ids, finish = self.outputs.pop(0), "stop"
        if isinstance(ids, tuple):
            ids, finish = ids
        stream = self.serving.stream(prompt)
        for i in ids[:-1]:
            yield Chunk(stream.feed([i]), 1)
        text = stream.feed(ids[-1:], finished=True)
        yield Chunk(text, 1, finish, tool_calls=list(stream.result.tool_calls) if tools else [])

    def close(self):
        pass


def formats(sp, g4, hf):
    return {"chatglm3": get_chat_format("chatglm3", tokenizer=sp, model_type="test"),
            "glm4": get_chat_format("glm4", tokenizer=g4, model_type="test"),
            "hermes": get_chat_format("jinja", tokenizer=hf, model_type="test", template=HERMES_TEMPLATE)}


def call_ids(f, name: str, arguments: dict) -> list[int]:
    """What each format's model writes to call `name`."""
    tok = f.tokenizer
    if f.name == "chatglm3":
        args = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        return tok.encode(name + "\n") + tok.encode(f"```python\ntool_call({args})\n```")
    if f.name == "glm4":
        return tok.encode(name + "\n" + json.dumps(arguments, ensure_ascii=False))
    return tok.encode(f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)}'
                      "\n</tool_call>")


def answer_ids(f, text: str) -> list[int]:
    tok = f.tokenizer
    return (tok.encode("\n") + tok.encode(text)) if f.name == "chatglm3" else tok.encode(("\n" if f.name == "glm4"
                                                                                            else "") + text)


def run(agent: Agent, messages=QUESTION) -> list:
    return list(agent.run(messages))


@pytest.mark.parametrize("name", ["chatglm3", "glm4", "hermes"])
def test_a_call_then_an_answer_in_every_format(sp, g4, hf, name):
    f = formats(sp, g4, hf)[name]
    backend = ScriptedBackend(f, [call_ids(f, "get_weather", {"city": "北京"}), answer_ids(f, "北京晴，22 度。")])
    events = run(Agent(backend, tools=[get_weather]))
    started = [e for e in events if isinstance(e, ToolStarted)]
    finished = [e for e in events if isinstance(e, ToolFinished)]
    assert [e.call.name for e in started] == ["get_weather"] and json.loads(started[0].call.arguments) == {"city": "北京"}
    assert not finished[0].observation.error and json.loads(finished[0].observation.text)["temperature_c"] == 22
    final = events[-1]
    assert isinstance(final, Final) and final.text.strip() == "北京晴，22 度。"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)).strip() == "北京晴，22 度。"  # no call text
    # The observation went back in the format's own observation turn, after the call
    second = backend.prompts[1]
    assert '"temperature_c": 22' in second
    marker = {"chatglm3": "<|observation|>", "glm4": "<|observation|>", "hermes": "<|im_start|>tool"}[name]
    assert second.index(marker) < second.index('"temperature_c": 22')
    roles = [m["role"] for m in final.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert final.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_chatglm3_interpreter_runs_in_a_real_kernel(sp):
    f = get_chat_format("chatglm3", tokenizer=sp, model_type="test")
    code = sp.encode("interpreter\n") + sp.encode("```python\nprint(2**100)\n```")
    backend = ScriptedBackend(f, [code, answer_ids(f, "算好了。")])
    with Agent(backend, code_interpreter=True) as agent:
        events = run(agent, [{"role": "user", "content": "2 的 100 次方是多少？"}])
    [done] = [e for e in events if isinstance(e, ToolFinished)]
    assert done.call.name == "interpreter" and done.observation.text.strip() == str(2**100)
    assert str(2**100) in backend.prompts[1]


def test_glm4_python_turn_runs_in_a_real_kernel(g4):
    """GLM-4's own code-interpreter form: the template's `python` block in the tools prompt, and a segment whose
    metadata line is `python` with a code fence (no JSON); it runs as the python tool and goes back in that form."""
    f = get_chat_format("glm4", tokenizer=g4, model_type="test")
    code = g4.encode("python\n```python\nprint(2**100)\n```")
    backend = ScriptedBackend(f, [code, answer_ids(f, "算好了。")])
    with Agent(backend, code_interpreter=True) as agent:
        events = run(agent, [{"role": "user", "content": "2 的 100 次方是多少？"}])
    [done] = [e for e in events if isinstance(e, ToolFinished)]
    assert done.call.name == "python" and json.loads(done.call.arguments) == {"code": "print(2**100)"}
    assert done.observation.text.strip() == str(2**100)
    first, second = backend.prompts
    assert "## python\n\n当你向 `python` 发送包含 Python 代码的消息时" in first and '"code"' not in first
    assert "<|assistant|>python\n```python\nprint(2**100)\n```<|observation|>" in second
    assert str(2**100) in second and events[-1].text.strip() == "算好了。"


def test_calls_written_as_bare_json_after_an_observation_are_a_round(hf):
    """The default model, offered several tools, answered an observation with a column of bare JSON "calls"
    cut by max_tokens. They are a round of calls (the complete ones run, the cut one is dropped); when the
    model then repeats them, the guard asks for an answer in words."""
    f = get_chat_format("jinja", tokenizer=hf, model_type="test", template=HERMES_TEMPLATE)
    column = ('{"name": "calculator", "arguments": {"expression": "6*7+0"}}\n'
              '{"name": "get_weather", "arguments": {"city": "北京"}}\n{"name": "calcu')
    backend = ScriptedBackend(f, [call_ids(f, "calculator", {"expression": "6*7"}),
                                  (hf.encode(column), "length"),
                                  hf.encode(column.rsplit("\n", 1)[0]),  # the same two, whole: parsed as calls
                                  answer_ids(f, "是 42。")])
    events = run(Agent(backend, tools=[calculator, get_weather]))
    finished = [e for e in events if isinstance(e, ToolFinished)]
    assert [e.call.name for e in finished] == ["calculator", "calculator", "get_weather"]
    assert [e.observation.text for e in finished[:2]] == ["42", "42"]
    assert backend.offered[-1] == [] and "Do not call a tool" in backend.prompts[-1]
    final = events[-1]
    assert final.text.strip() == "是 42。" and final.finish_reason == "stop"
    assert [m["role"] for m in final.messages] == ["user", "assistant", "tool", "assistant", "tool", "tool",
                                                   "assistant"]
    assert not final.messages[3]["content"]  # the JSON text became calls, not words
    assert not any('"name"' in e.text for e in events if isinstance(e, TextDelta))  # and never showed as words
    assert final.total_tokens == sum(len(o[0] if isinstance(o, tuple) else o) for o in [
        call_ids(f, "calculator", {"expression": "6*7"}), hf.encode(column), hf.encode(column.rsplit("\n", 1)[0]),
        answer_ids(f, "是 42。")])


def test_parallel_calls_run_together_and_come_back_in_order(hf):
    f = get_chat_format("jinja", tokenizer=hf, model_type="test", template=HERMES_TEMPLATE)
    two = call_ids(f, "get_weather", {"city": "北京"}) + hf.encode("\n") + call_ids(f, "calculator",
                                                                                   {"expression": "2^10"})
    backend = ScriptedBackend(f, [two, answer_ids(f, "好的")])
    events = run(Agent(backend, tools=[get_weather, calculator]))
    finished = [e for e in events if isinstance(e, ToolFinished)]
    assert [e.call.name for e in finished] == ["get_weather", "calculator"]
    assert finished[1].observation.text == "1024"
    tool_messages = [m for m in events[-1].messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == [e.call.id for e in finished]


def test_bad_calls_become_observations_and_the_loop_goes_on(hf):
    f = get_chat_format("jinja", tokenizer=hf, model_type="test", template=HERMES_TEMPLATE)
    backend = ScriptedBackend(f, [call_ids(f, "get_weather", {"town": "北京"}), call_ids(f, "no_such_tool", {}),
                                  answer_ids(f, "抱歉")])
    events = run(Agent(backend, tools=[get_weather]))
    observations = [e.observation for e in events if isinstance(e, ToolFinished)]
    assert all(o.error for o in observations)
    assert "city" in observations[0].text and "get_weather" in observations[1].text
    assert isinstance(events[-1], Final) and events[-1].text.strip() == "抱歉"


def test_rounds_are_bounded_then_the_model_answers_without_tools(hf):
    f = get_chat_format("jinja", tokenizer=hf, model_type="test", template=HERMES_TEMPLATE)
    backend = ScriptedBackend(f, [call_ids(f, "get_weather", {"city": "北京"}), call_ids(f, "get_weather", {"city": "上海"}),
                                  answer_ids(f, "够了")])
    events = run(Agent(backend, tools=[get_weather], max_rounds=2))
    assert sum(isinstance(e, ToolFinished) for e in events) == 2
    assert events[-1].text.strip() == "够了"
    assert backend.offered == [["get_weather"], ["get_weather"], []]
    assert "Do not call a tool" in backend.prompts[2] and "Do not call a tool" not in backend.prompts[1]
    assert all(m["role"] != "system" for m in events[-1].messages)  # the note is not kept


def test_a_call_repeated_is_not_run_again_and_the_model_answers(hf):
    """Small models go round in circles (the default model calls python with its own result, then again): a
    round of calls already answered ends the loop with a round without tools."""
    f = get_chat_format("jinja", tokenizer=hf, model_type="test", template=HERMES_TEMPLATE)
    spaced = hf.encode('<tool_call>\n{"arguments": {"city":"北京"}, "name": "get_weather"}\n</tool_call>')
    backend = ScriptedBackend(f, [call_ids(f, "get_weather", {"city": "北京"}), spaced, answer_ids(f, "晴")])
    events = run(Agent(backend, tools=[get_weather]))
    assert sum(isinstance(e, ToolFinished) for e in events) == 1
    assert backend.offered == [["get_weather"], ["get_weather"], []] and "Do not call a tool" in backend.prompts[2]
    assert events[-1].text.strip() == "晴"
    assert [m["role"] for m in events[-1].messages] == ["user", "assistant", "tool", "assistant"]


def test_hostile_call_text_never_reaches_eval(sp, g4, hf, tmp_path):
    """Calls whose arguments are code: parsed as data, checked against the schema, never executed."""
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for f in formats(sp, g4, hf).values():
        outputs = [call_ids(f, "calculator", {"expression": payload}),
                   call_ids(f, "get_weather", {"city": payload}),
                   f.tokenizer.encode(f"calculator\n```python\ntool_call(expression={payload})\n```"),
                   answer_ids(f, "完")]
        events = run(Agent(ScriptedBackend(f, outputs), tools=[calculator, get_weather], max_rounds=3))
        assert isinstance(events[-1], Final)
    assert not marker.exists()


def test_local_backend_over_an_llm_replaying_scripted_ids(tmp_path_factory, hf_tokenizer_dir, hf, monkeypatch):
    from checkpoint_fixtures import llama_config, make_hf_dir, random_llama_state

    config = llama_config(hf.vocab_size)
    d = make_hf_dir(tmp_path_factory.mktemp("agent-qwen"), random_llama_state(config, seed=3), config,
                    hf_tokenizer_dir)
    llm = LLM(str(d), dtype="float32", device="cpu", chat_format="jinja")
    outputs = [hf.encode('<tool_call>\n{"name": "calculator", "arguments": {"expression": "2**100"}}\n</tool_call>'),
               hf.encode("答案是 1267650600228229401496703205376。")]

    def deltas(requests):
        ids = outputs.pop(0)
        for i, token in enumerate(ids):
            yield Delta("r", 0, "", [token], finish_reason="stop" if i == len(ids) - 1 else None)

    monkeypatch.setattr(llm, "_deltas", deltas)
    events = run(Agent(LocalBackend(llm), tools=[calculator]), [{"role": "user", "content": "2**100?"}])
    [done] = [e for e in events if isinstance(e, ToolFinished)]
    assert done.observation.text == str(2**100)
    assert str(2**100) in events[-1].text


def test_backend_errors_end_the_turn_with_an_error_event(hf):
    from glmkit.ui.backends import BackendError

    class Failing(ScriptedBackend):
        def stream(self, messages, settings, tools=None, tool_choice=None):
            raise BackendError("the server went away")
            yield  # a generator

    f = get_chat_format("jinja", tokenizer=hf, model_type="test", template=HERMES_TEMPLATE)
    events = run(Agent(Failing(f, []), tools=[get_weather]))
    assert isinstance(events[-1], AgentError) and "went away" in events[-1].message


def test_the_terminal_shows_a_tool_turn(hf):
    from glmkit.ui.console import Console
    from glmkit.ui.conversation import Conversation
    from glmkit.ui.session import ChatSession

    f = get_chat_format("jinja", tokenizer=hf, model_type="test", template=HERMES_TEMPLATE)
    backend = ScriptedBackend(f, [call_ids(f, "calculator", {"expression": "6*7"}), answer_ids(f, "是 42。")])
    out = io.StringIO()
    session = ChatSession(backend, Console(False, out=out, err=out), Conversation(),
                          {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0}, False,
                          agent=Agent(backend, tools=[calculator]))
    reply = session.ask("6 乘 7？")
    text = out.getvalue()
    assert "⚙ calculator" in text and "→" in text and "42" in text
    assert reply.text.strip() == "是 42。"
    assert [m["role"] for m in session.conversation.messages] == ["user", "assistant", "tool", "assistant"]


# --- the real default model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_llm():
    return LLM()


@pytest.mark.slow
def test_default_model_computes_2_to_the_100_with_the_python_tool(default_llm):
    with Agent(default_llm, code_interpreter=True, settings={"temperature": 0.0, "max_tokens": 256}) as agent:
        events = run(agent, [{"role": "user", "content": "Use Python to compute 2**100 and tell me the exact result."}])
    calls = [e for e in events if isinstance(e, ToolFinished)]
    assert calls and calls[0].call.name in ("python", "interpreter"), [type(e).__name__ for e in events]
    assert str(2**100) in calls[0].observation.text
    assert str(2**100) in events[-1].text.replace(",", "")


@pytest.mark.slow
def test_default_model_uses_the_calculator(default_llm):
    agent = Agent(default_llm, tools=[calculator], settings={"temperature": 0.0, "max_tokens": 256})
    events = run(agent, [{"role": "user", "content": "What is 123456 * 654321? Use the calculator."}])
    calls = [e for e in events if isinstance(e, ToolFinished)]
    assert calls and calls[0].call.name == "calculator" and calls[0].observation.text == str(123456 * 654321)
    assert str(123456 * 654321) in events[-1].text.replace(",", "")



# --- glmkit chat's tool flags ------------------------------------------------------------------------------------

def _chat(glm_dir, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    import sys

    args = [sys.executable, "-m", "glmkit.cli", "chat", "--model", str(glm_dir), "--temperature", "0",
            "--max-tokens", "8", "--threads", "1", "--kv-cache-memory", "0.02", *flags]
    env = {**os.environ, "GLMKIT_HOME": str(tmp_path), "NO_COLOR": "1"}
    return subprocess.run(args, input=b"hello\n", capture_output=True, env=env, timeout=300)


def test_chat_with_every_tool_flag_starts_and_ends_clean(glm_dir, tmp_path):
    tools_file = tmp_path / "mytools.py"
    tools_file.write_text("from glmkit.tools import tool\n\n@tool\ndef shout(text: str) -> str:\n"
                          '    """Upper-case text."""\n    return text.upper()\n')
    mcp = tmp_path / "mcp.json"
    mcp.write_text(json.dumps({"mcpServers": {"broken": {"command": str(tmp_path / "no-such-server")}}}))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    proc = _chat(glm_dir, tmp_path, "--tools", "builtin", "--tools", str(tools_file), "--code-interpreter",
                 "--mcp-config", str(mcp), "--workspace", str(workspace))
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "broken" in err  # the MCP server that cannot start is reported; the chat goes on
    assert not [p for p in _kernel_processes() if str(workspace) in " ".join(p)]  # the kernel is gone


@pytest.mark.parametrize("flags, names", [
    (("--sandbox",), "--sandbox"),
    (("--tools", "calculator.py"), "calculator.py"),
    (("--allow-shell",), "--allow-shell"),
])
def test_chat_tool_flags_that_cannot_work_are_one_line(glm_dir, tmp_path, flags, names):
    proc = _chat(glm_dir, tmp_path, *flags)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0 and names in err and "Traceback" not in err, err


def _kernel_processes() -> list[list[str]]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if any("ipykernel" in part for part in cmd):
            out.append(cmd)
    return out
