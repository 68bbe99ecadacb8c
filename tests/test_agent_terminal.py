"""Tool turns in the terminal, driven by a scripted OpenAI-compatible server (a stdlib HTTP server in this
process that answers each chat request with the next scripted reply: a tool call or words): Ctrl-C while the
code interpreter runs a cell interrupts the cell and the session goes on with the same kernel, and the
answer's cut mark counts the tokens of the generation that was cut.
"""

from __future__ import annotations

import io
import os
import sys
import time

import pytest

from scripted_server import ScriptedServer

from glmkit.tools.agent import Agent
from glmkit.tools.builtins import calculator
from glmkit.ui.backends import RemoteBackend
from glmkit.ui.console import Console
from glmkit.ui.conversation import Conversation
from glmkit.ui.session import ChatSession

pexpect = pytest.importorskip("pexpect")


def test_ctrl_c_interrupts_a_running_cell_and_the_session_goes_on(tmp_path):
    server = ScriptedServer([
        ("call", "python", {"code": "import time\nbefore = 1\ntime.sleep(120)"}),
        ("call", "python", {"code": "print(before * 6 * 7)"}),
        ("text", "算好了：42。", "stop", 6),
    ])
    env = {**os.environ, "GLMKIT_HOME": str(tmp_path), "TERM": "xterm", "PYTHONIOENCODING": "utf-8",
           "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "glmkit.cli", "chat", "--url", server.url, "--code-interpreter",
                                           "--workspace", str(tmp_path)],
                          env=env, encoding="utf-8", codec_errors="replace", dimensions=(50, 200), timeout=60)
    try:
        child.expect_exact("\x1b[?2004h")  # the first prompt
        child.send("睡一会儿\r")
        child.expect_exact("⚙ python")
        time.sleep(2)  # the cell is sleeping in the kernel
        start = time.monotonic()
        child.sendintr()
        child.expect_exact("[stopped]", timeout=20)
        stopped_s = time.monotonic() - start
        child.expect_exact("\x1b[?2004h")
        # The same kernel (its variable survived the interrupt) answers at once: the sleeping cell is gone
        start = time.monotonic()
        child.send("再算一次\r")
        child.expect_exact("算好了：42。", timeout=30)
        second_s = time.monotonic() - start
        shown = child.before  # the call and its observation
        child.expect_exact("\x1b[?2004h")
        child.send("/bye\r")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.terminate(force=True)
        server.close()
    assert stopped_s < 10, stopped_s
    assert second_s < 20, second_s
    assert "⚙ python" in shown and "42" in shown, shown
    observation = [m for m in server.requests[2]["messages"] if m["role"] == "tool"]
    assert observation[-1]["content"].strip() == "42"
    # The stopped turn kept no calls: the second turn's conversation is user, (stopped) answer, user
    assert [m["role"] for m in server.requests[1]["messages"]][:3] == ["user", "assistant", "user"]


def test_the_cut_mark_counts_the_last_generation_of_a_tool_turn():
    """A tool turn of two generations (8 tokens for the call, 16 for the words), cut at max_tokens 16: the
    mark says max tokens (the words used them all), not a full context."""
    server = ScriptedServer([("call", "calculator", {"expression": "6*7"}), ("text", "答案是 42，" * 4, "length", 16)])
    out = io.StringIO()
    backend = RemoteBackend(server.url)
    settings = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0}
    session = ChatSession(backend, Console(False, out=out, err=out), Conversation(), settings, True,
                          agent=Agent(backend, tools=[calculator]))
    try:
        reply = session.ask("6 乘 7？")
    finally:
        server.close()
    text = out.getvalue()
    assert "[cut: max tokens reached]" in text and "context full" not in text, text
    assert reply.finish_reason == "length" and reply.last_tokens == 16
