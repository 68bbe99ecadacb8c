"""The command line's failures as a user meets them: a bad flag, a misspelled flag or command, a port in use, bad
bytes on stdin, a missing model, Ctrl-C. Each is one line on stderr (two at most), no traceback, exit code 2 (130
for Ctrl-C), and flag checks finish before torch is imported or anything loads."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from glmkit import cli

PYTHON = sys.executable


def glmkit(*args, input=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "glmkit.cli", *args], input=input, capture_output=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("glmkit: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("port", ["70000", "0"])
def test_port_out_of_range(port):
    assert_one_line_error(glmkit("serve", "--port", port), f"--port={port}", "65535")


def test_threads_zero_names_the_flag():
    err = assert_one_line_error(glmkit("chat", "--threads", "0"), "--threads=0", ">= 1")
    assert "num_threads" not in err


def test_kv_cache_memory_zero_names_the_flag():
    err = assert_one_line_error(glmkit("chat", "--kv-cache-memory", "0"), "--kv-cache-memory=0", "> 0")
    assert "kv_cache_memory_gb" not in err


def test_generate_max_tokens_zero_fails_before_loading():
    start = time.monotonic()
    proc = glmkit("generate", "--prompt", "hi", "--max-tokens", "0")
    assert time.monotonic() - start < 5
    assert_one_line_error(proc, "--max-tokens=0", ">= 1")


def test_misspelled_flag_gets_a_suggestion():
    assert_one_line_error(glmkit("chat", "--temprature", "0.5"), "unrecognized argument --temprature",
                          "did you mean --temperature?")


def test_misspelled_command_gets_a_suggestion():
    assert_one_line_error(glmkit("chta"), "unknown command 'chta'", "did you mean 'chat'?")


def test_version():
    proc = glmkit("--version")
    assert proc.returncode == 0 and proc.stdout.decode().strip() == f"glmkit {cli.version()}"
    assert cli.version() == "0.1.0"


def test_port_in_use(glm_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        proc = glmkit("serve", "--port", str(port), "--model", str(glm_dir), "--embedding-model", "none")
        assert time.monotonic() - start < 10  # refused before the model loads
    assert_one_line_error(proc, f"--port={port}", "already in use", "--port ")


def test_undecodable_stdin_is_replaced_not_a_crash(glm_dir):
    proc = subprocess.run([PYTHON, "-m", "glmkit.cli", "generate", "--model", str(glm_dir), "--prompt", "-",
                           "--max-tokens", "4"], input=b"hello \xff\xfe world\n", capture_output=True, timeout=120,
                          env={**_env(), "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0"})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr


def test_missing_model_path():
    assert_one_line_error(glmkit("chat", "--model", "/no/such/model"), "--model='/no/such/model'", "does not exist")


@pytest.mark.parametrize("args,needle", [
    (["generate", "--prompt", "x", "--temperature", "-1"], "--temperature=-1: must be in [0, 100]"),
    (["generate", "--prompt", "x", "--top-p", "0"], "--top-p=0: must be in (0, 1]"),
    (["generate", "--prompt", "x", "--top-p", "abc"], "--top-p='abc'"),
    (["chat", "--max-model-len", "0"], "--max-model-len=0"),
    (["chat", "--quantization", "int3"], "--quantization='int3': must be one of auto, none, int8, int8a8, int4"),
    (["chat", "--device", "gpu"], "--device='gpu'"),
    (["serve", "--max-queue", "0"], "--max-queue=0"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs=0"),
    (["quantize", "--quantization", "int4", "--output", "x", "--group-size", "48"], "--group-size=48"),
    (["chat", "--temperature"], "--temperature needs a value"),
    (["generate"], "missing --prompt"),
    ([], "missing command"),
])
def test_more_bad_flags_in_process(capsys, args, needle):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_a_bad_flag_and_help_do_not_import_torch():
    code = ("import sys\nfrom glmkit.cli import main\nrc = main(['chat', '--threads', '0'])\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint(rc, 'torch' in sys.modules)")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "2 False", proc.stdout + proc.stderr


def sigint_default() -> None:
    """In the child before exec: Ctrl-C raises KeyboardInterrupt there even when this test run was started in
    the background of a shell without job control, which starts it with SIGINT ignored (inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_waiting_for_stdin():
    """generate reads its prompt before loading; Ctrl-C there is one line and 130."""
    code = "import sys\nfrom glmkit import cli\nprint('ready', flush=True)\nsys.exit(cli.main(sys.argv[1:]))"
    proc = subprocess.Popen([PYTHON, "-c", code, "generate", "--prompt", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err == "glmkit: interrupted\n", err


def test_ctrl_c_while_the_chat_loads(glm_dir):
    """SIGINT while `glmkit chat` loads its model (held in the load by a hook, so the signal lands there)."""
    code = ("import sys, time\nfrom glmkit import cli, llm\nreal = llm.load_model\n"
            "def held(*a, **k):\n    print('loading', flush=True)\n    time.sleep(60)\n    return real(*a, **k)\n"
            "llm.load_model = held\nsys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([PYTHON, "-c", code, "chat", "--model", str(glm_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    deadline = time.monotonic() + 120
    while proc.stdout.readline().strip() != "loading":
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "interrupted" in line][0].startswith("glmkit: interrupted")


def test_ctrl_c_in_any_command_is_one_line(monkeypatch, capsys):
    from glmkit.commands import info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "main", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "glmkit: interrupted\n"


def test_unexpected_error_is_one_line_and_traceback_with_v(monkeypatch, capsys):
    from glmkit.commands import info

    def broken(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(info, "main", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err == "glmkit: error: RuntimeError: boom second line (run with -v for the traceback)\n"
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["-v", "info"])
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["info", "-v"])


def test_generate_streams_deltas_that_add_up(glm_dir):
    from glmkit import LLM, SamplingParams

    llm = LLM(str(glm_dir), device="cpu", max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    pieces = list(llm.stream("hello world", params))
    assert len(pieces) == 12 and pieces[-1][1].finish_reason == "length"
    assert "".join(text for text, _ in pieces) == llm.generate("hello world", params)[0].text


def test_generate_flushes_each_delta(monkeypatch, capsys):
    """Each piece is written and flushed as the engine yields it, before the next one is produced."""
    from glmkit.commands import generate

    events = []

    class FakeLLM:
        def stream(self, prompt, params):
            for piece in ("def", " add", "(a, b):"):
                events.append(("yield", piece))
                yield piece, None

    class Out:
        def write(self, text):
            events.append(("write", text))

        def flush(self):
            events.append(("flush", None))

    monkeypatch.setattr(generate, "load_llm", lambda args, **kw: FakeLLM())
    monkeypatch.setattr(sys, "stdout", Out())
    assert cli.main(["generate", "--prompt", "x"]) == 0
    assert events[:6] == [("yield", "def"), ("write", "def"), ("flush", None),
                          ("yield", " add"), ("write", " add"), ("flush", None)]


def _env() -> dict:
    import os

    return dict(os.environ)


@pytest.mark.parametrize("flag, expected", [((), None), (("--threads", "3"), 3)])
def test_single_stream_commands_leave_one_core_free(glm_dir, flag, expected):
    import os

    proc = glmkit("generate", "--model", str(glm_dir), "--prompt", "hi", "--max-tokens", "2", *flag)
    assert proc.returncode == 0, proc.stderr
    expected = expected or max(1, len(os.sched_getaffinity(0)) - 1)
    assert f"num_threads={expected} " in proc.stderr.decode()  # the resolved configuration line
