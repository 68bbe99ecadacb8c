"""`glmkit chat` driven as a person drives it: in a real pseudo-terminal with pexpect (history, paste, \"\"\" blocks,
Alt-Enter, every slash command, Ctrl-C, Ctrl-D, context overflow), over pipes, and against a live in-process
server through --url.

The tiny model writes gibberish, so the tests assert structure, markers and notices, never content; what was
sent is checked through /save's JSON. Most interactive tests share one chat process (starting one costs a torch
import and a model load), each leaving it at a fresh prompt. Waiting is for the *next prompt*, which comes right
after the output: a wrong screen fails at once instead of waiting for a timeout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest

pexpect = pytest.importorskip("pexpect")

STARTUP_S = 60   # python, torch and a tiny model on a loaded 2-core machine
STEP_S = 30      # one command or one short answer
SCREEN_S = 5     # a redraw of the line being edited
BOT = "tiny/chatglm3-6b："  # the tiny checkpoint's name, before each answer
# prompt_toolkit turns bracketed paste on as each prompt starts (and off when the line is accepted): this marks
# a new prompt, never the redraw of the line just accepted (which shows the prompt's label again).
NEW_PROMPT = "\x1b[?2004h"
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|[\r\x07]")
SPINNER = "[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]"
# Fresh and greedy, the tiny model answers this with 300+ tokens (no stop token): long enough to interrupt.
LONG_ANSWER_QUESTION = "晚上睡不着应该怎么办"


def screen(text: str) -> str:
    return ESCAPES.sub("", text)


def chat_env(home, colour: bool = False) -> dict:
    env = {**os.environ, "GLMKIT_HOME": str(home), "TERM": "xterm", "PYTHONIOENCODING": "utf-8",
           "PROMPT_TOOLKIT_NO_CPR": "1"}  # pexpect does not answer cursor-position requests
    env.pop("NO_COLOR", None)
    if not colour:
        env["NO_COLOR"] = "1"
    return env


def chat_args(*flags: str, model=None) -> list[str]:
    source = ["--model", str(model)] if model is not None else []
    return ["-m", "glmkit.cli", "chat", *source, "--temperature", "0", "--max-tokens", "8", "--threads", "1",
            "--kv-cache-memory", "0.02", *flags]


def spawn(home, *flags, model=None, colour: bool = False):
    child = pexpect.spawn(sys.executable, chat_args(*flags, model=model), env=chat_env(home, colour),
                          encoding="utf-8", codec_errors="replace", dimensions=(50, 220), timeout=STEP_S)
    child.expect_exact(NEW_PROMPT, timeout=STARTUP_S)
    return child


def enter(child, line: str, *expected: str) -> str:
    """Type a line and Enter; wait for the next prompt; return the screen text in between (which holds the
    accepted line's redraw, then the output) after checking it shows each of `expected`."""
    child.send(line + "\r")
    child.expect_exact(NEW_PROMPT)
    out = screen(child.before)
    for piece in expected:
        assert piece in out, out
    return out


def output_lines(out: str) -> list[str]:
    """The lines the chat printed (without the redraw of the line that was typed, which shows the label)."""
    return [line for line in out.split("\n") if line.strip() and "用户：" not in line and "....." not in line]


def quit_with(child, keys: str) -> int:
    child.send(keys)
    child.expect(pexpect.EOF, timeout=STEP_S)
    child.close()
    return child.exitstatus


def saved(child, path) -> dict:
    enter(child, f"/save {path}", "(saved ")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chat(glm_dir, tmp_path_factory):
    """One interactive session shared by the tests below (each leaves it at a fresh prompt)."""
    child = spawn(tmp_path_factory.mktemp("glmkit-home"), model=glm_dir)
    yield child
    if child.isalive():
        child.terminate(force=True)


@pytest.fixture
def fresh(chat):
    """The shared session with an empty conversation and the starting settings."""
    assert chat.isalive(), "the shared chat session has ended"
    for line in ("/clear", "/set temperature 0", "/set max_tokens 8"):
        enter(chat, line)
    return chat


# --- slash commands ------------------------------------------------------------------------------------------

def test_help_lists_every_command(fresh):
    out = enter(fresh, "/help")
    for name in ("/help", "/bye", "/clear", "/system", "/set", "/show", "/save", "/load", "/stats"):
        assert name in out
    assert BOT not in out


def test_set_then_show(fresh):
    enter(fresh, "/set temperature 0.5", "(temperature=0.5)")
    enter(fresh, "/set top-p 0.9", "(top_p=0.9)")  # the flag's spelling works too
    out = enter(fresh, "/show", "temperature=0.5", "top_p=0.9", "max_tokens=8", "turns: 0", "local, ")
    assert BOT not in out
    enter(fresh, "/set top_p 0.8")


@pytest.mark.parametrize("line, message", [
    ("/set temperature abc", "/set temperature abc: not a number"),
    ("/set top_p 2", "/set top_p 2: must be in (0, 1]"),
    ("/set max_tokens 0", "/set max_tokens 0: must be a positive integer"),
    ("/set temprature 0.3", "did you mean temperature?"),
    ("/set seed", "/set seed: needs a value"),
])
def test_bad_set_value_is_one_line_and_the_session_goes_on(fresh, line, message):
    out = enter(fresh, line, message)
    assert len(output_lines(out)) == 1, out
    enter(fresh, "/show", "temperature=0.0", "max_tokens=8")  # nothing changed


def test_unknown_command_suggests_the_closest_and_is_not_sent(fresh):
    out = enter(fresh, "/sytem be brief", "unknown command /sytem; did you mean /system?", "/help")
    assert len(output_lines(out)) == 1 and BOT not in out
    enter(fresh, "/show", "turns: 0")


def test_a_path_is_a_message_not_a_command(fresh, tmp_path):
    enter(fresh, "/usr/bin/env is what?", BOT)
    assert saved(fresh, tmp_path / "c.json")["messages"][0]["content"] == "/usr/bin/env is what?"


def test_system_sets_the_prompt_and_starts_over(fresh, tmp_path):
    enter(fresh, "hello", BOT)
    enter(fresh, "/system be brief", "system prompt set")
    enter(fresh, "/show", "system prompt: be brief", "turns: 0")
    enter(fresh, "/system", "system prompt: be brief")
    data = saved(fresh, tmp_path / "c.json")
    assert data["system"] == "be brief" and data["messages"] == []
    enter(fresh, "/clear")
    enter(fresh, "/show", "system prompt: be brief")  # /clear keeps it
    enter(fresh, "/system nothing special")


def test_clear_forgets_the_conversation(fresh):
    enter(fresh, "hello", BOT)
    enter(fresh, "/show", "turns: 1")
    enter(fresh, "/clear", "(conversation cleared)")
    enter(fresh, "/show", "turns: 0")


def test_stats_toggles_the_line_after_each_answer(fresh):
    enter(fresh, "/stats", "(stats on)")
    assert re.search(r"\[(first token [0-9.]+s, \d+ tokens|no tokens)", enter(fresh, "hello", BOT))
    enter(fresh, "/stats", "(stats off)")
    assert "tokens" not in enter(fresh, "hello again", BOT)


def test_save_then_load_restores_the_conversation(fresh, tmp_path):
    enter(fresh, "first question", BOT)
    enter(fresh, "second question", BOT)
    enter(fresh, "/set temperature 0.3")
    path = tmp_path / "conversation.json"
    data = saved(fresh, path)
    assert set(data) == {"system", "messages", "settings"}
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2
    assert [m["content"] for m in data["messages"][::2]] == ["first question", "second question"]
    assert data["settings"]["temperature"] == 0.3 and data["settings"]["max_tokens"] == 8
    enter(fresh, "/clear")
    enter(fresh, "/set temperature 0")
    enter(fresh, f"/load {path}", f"(loaded {path}: 2 turns", "temperature=0.3")
    enter(fresh, "/show", "turns: 2", "temperature=0.3")
    enter(fresh, "third question", BOT)
    assert len(saved(fresh, tmp_path / "after.json")["messages"]) == 6


def test_load_errors_are_one_line(fresh, tmp_path):
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    (tmp_path / "notjson.txt").write_text("hello")
    (tmp_path / "hot.json").write_text('{"messages": [], "settings": {"temperature": "hot"}}')
    for line, message in [(f"/load {tmp_path / 'missing.json'}", "cannot read it"),
                          (f"/load {tmp_path / 'notjson.txt'}", "not JSON"),
                          (f"/load {tmp_path / 'bad.json'}", "messages[0]"),
                          (f"/load {tmp_path / 'hot.json'}", "settings.temperature='hot' must be float"),
                          ("/load", "/load needs a file name")]:
        out = enter(fresh, line, message)
        assert len(output_lines(out)) == 1, out


# --- multi-line input ----------------------------------------------------------------------------------------

def test_a_bracketed_paste_is_one_message(fresh, tmp_path):
    fresh.send("\x1b[200~line1\nline2\nline3\x1b[201~")
    out = enter(fresh, "")
    assert out.count(BOT) == 1, out
    assert saved(fresh, tmp_path / "c.json")["messages"][0]["content"] == "line1\nline2\nline3"


def test_a_triple_quote_block_is_one_message(fresh, tmp_path):
    fresh.send('"""\r')
    fresh.send("first line\r")
    out = enter(fresh, 'second line"""')
    assert out.count(BOT) == 1, out
    assert saved(fresh, tmp_path / "c.json")["messages"][0]["content"] == "first line\nsecond line"


def test_alt_enter_inserts_a_newline(fresh, tmp_path):
    fresh.send("up\x1b\r")  # Alt-Enter arrives as Esc, Enter
    out = enter(fresh, "down")
    assert out.count(BOT) == 1, out
    assert saved(fresh, tmp_path / "c.json")["messages"][0]["content"] == "up\ndown"


# --- answers: cut, stopped; Ctrl-C at the prompt -------------------------------------------------------------

def test_an_answer_cut_by_max_tokens_is_marked(fresh):
    enter(fresh, LONG_ANSWER_QUESTION, BOT, "[cut: max tokens reached]")


def test_ctrl_c_stops_an_answer_and_the_session_goes_on(fresh, tmp_path):
    enter(fresh, "/set max_tokens 400")
    fresh.send(LONG_ANSWER_QUESTION + "\r")
    fresh.expect(SPINNER)  # waiting for the answer's first text
    fresh.sendintr()
    fresh.expect_exact(NEW_PROMPT)
    assert "[stopped]" in screen(fresh.before)
    enter(fresh, "/set max_tokens 8")
    enter(fresh, "hello", BOT)  # the next question is answered
    assert len(saved(fresh, tmp_path / "c.json")["messages"]) == 4


def test_ctrl_c_at_the_prompt_does_not_quit(fresh):
    fresh.sendintr()
    fresh.expect_exact(NEW_PROMPT)
    assert "/bye or press Ctrl-D" in screen(fresh.before)
    fresh.send("half a line")
    fresh.sendintr()  # clears it
    fresh.expect_exact(NEW_PROMPT)
    enter(fresh, "/show", "turns: 0")


# --- sessions of their own: history, exit keys, context overflow ----------------------------------------------

def test_history_recalls_with_up_and_persists_across_sessions(glm_dir, tmp_path):
    child = spawn(tmp_path, model=glm_dir)
    enter(child, "what is up", BOT)
    child.send("\x1b[A")  # Up
    child.expect_exact("what is up", timeout=SCREEN_S)
    child.send("\x15")  # Ctrl-U empties the line again
    assert quit_with(child, "\x04") == 0  # Ctrl-D at an empty prompt quits
    assert "what is up" in (tmp_path / "chat_history").read_text(encoding="utf-8")

    child = spawn(tmp_path, model=glm_dir)
    child.send("\x1b[A")
    child.expect_exact("what is up", timeout=SCREEN_S)
    child.send("\x15")
    assert quit_with(child, "stop\r") == 0  # the ChatGLM demos' word still quits


def test_unwritable_history_is_said_once_and_kept_in_memory(glm_dir, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    child = spawn(not_a_dir, model=glm_dir)
    assert "history is kept for this session only" in screen(child.before)
    out = enter(child, "hello", BOT)
    assert "history is kept" not in out
    child.send("\x1b[A")
    child.expect_exact("hello", timeout=SCREEN_S)
    child.send("\x15")
    assert quit_with(child, "/bye\r") == 0


def test_context_overflow_drops_the_oldest_turns_and_the_session_goes_on(glm_dir, tmp_path):
    child = spawn(tmp_path, "--max-model-len", "64", "--system", "be brief", model=glm_dir)
    for i in range(8):
        out = enter(child, f"message number {i}", BOT)
        if "dropped" in out:
            break
    assert re.search(r"\(dropped \d+ earlier turns? to fit the 64-token context\)", out), out
    assert out.index("dropped") < out.index(BOT)  # said before the answer
    out = enter(child, "word " * 100, "does not fit the 64-token context")
    assert BOT not in out and len(output_lines(out)) == 1
    out = enter(child, "/show", "system prompt: be brief")
    assert int(re.search(r"turns: (\d+)", out).group(1)) >= 1  # the earlier turns that fit are kept
    enter(child, "still here?", BOT)
    assert quit_with(child, "/bye\r") == 0


# --- over a pipe -------------------------------------------------------------------------------------------------

def run_piped(glm_dir, tmp_path, data: bytes, *flags: str) -> subprocess.CompletedProcess:
    env = chat_env(tmp_path)
    del env["NO_COLOR"]  # colour must turn itself off: stdout is not a terminal
    proc = subprocess.run([sys.executable, *chat_args("--stats", *flags, model=glm_dir)], input=data,
                          capture_output=True, env=env, timeout=STARTUP_S + STEP_S)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc


def num_answers(stderr: bytes) -> int:
    """Each answer's stats line (on stderr over a pipe)."""
    return len(re.findall(r"^\[(?:first token|no tokens)", stderr.decode(errors="replace"), re.M))


def test_piped_stdin_is_one_message_and_nothing_is_a_command(glm_dir, tmp_path):
    proc = run_piped(glm_dir, tmp_path, b"first line\nstop\n/bye\n")
    assert num_answers(proc.stderr) == 1
    out = proc.stdout.decode(errors="replace")
    assert "Chatting with" not in out and BOT not in out and "\x1b" not in out  # answers only, no colour
    assert not (tmp_path / "chat_history").exists()


def test_piped_line_mode_answers_each_line(glm_dir, tmp_path):
    proc = run_piped(glm_dir, tmp_path, b"first line\nstop\n/bye\n", "--line-mode")
    assert num_answers(proc.stderr) == 3


def test_piped_undecodable_bytes_do_not_crash(glm_dir, tmp_path):
    proc = run_piped(glm_dir, tmp_path, b"caf\xe9 \xff\xfe ok\n")
    err = proc.stderr.decode(errors="replace")
    assert num_answers(proc.stderr) == 1 and "not valid UTF-8" in err and "Traceback" not in err


# --- --url: a live server ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_url(glm_dir):
    uvicorn = pytest.importorskip("uvicorn")
    from server_api_support import make_app, wait_until
    from server_fixtures import free_port

    # A 64-token context, so a few turns overflow it (the chat learns that only from the server's refusals).
    app = make_app(glm_dir, engine_kwargs=dict(dtype="float32", device="cpu", kv_cache_memory_gb=0.02,
                                               max_model_len=64))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn-chat-test", daemon=True)
    thread.start()
    assert wait_until(lambda: server.started or not thread.is_alive(), STARTUP_S) and server.started
    yield f"http://127.0.0.1:{server.config.port}/v1"
    server.should_exit = True
    thread.join(15)


def test_url_chats_with_a_live_server(live_url, tmp_path):
    child = spawn(tmp_path, "--url", live_url, colour=True)
    child.send("hello\r")
    child.expect_exact(NEW_PROMPT)
    raw = child.before
    assert "\x1b[1;36mtiny\x1b[0m：" in raw  # the bot's name, in colour: served as "tiny"
    enter(child, "/show", f"model: tiny ({live_url})", "turns: 1")
    assert quit_with(child, "/bye\r") == 0


def test_url_context_overflow_drops_turns_on_the_servers_refusal(live_url, tmp_path):
    child = spawn(tmp_path, "--url", live_url, "--system", "be brief")
    for i in range(10):
        out = enter(child, f"message number {i}", "tiny：")
        if "dropped" in out:
            break
    assert re.search(r"\(dropped \d+ earlier turns? to fit the server's context\)", out), out
    out = enter(child, "word " * 100, "does not fit the model's context", "max_model_len")
    assert "tiny：" not in out and len(output_lines(out)) == 1
    enter(child, "still here?", "tiny：")
    assert quit_with(child, "/bye\r") == 0


def test_url_unreachable_is_a_one_line_error(tmp_path):
    from server_fixtures import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    proc = subprocess.run([sys.executable, "-m", "glmkit.cli", "chat", "--url", url], input=b"hello\n",
                          capture_output=True, env=chat_env(tmp_path), timeout=STARTUP_S)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith(f"glmkit: error: cannot reach {url}") and "refused" in err
