"""The code interpreter (glmkit.tools.kernel, glmkit.tools.sandbox) with real Jupyter kernels: output in order,
plots, tracebacks, the output cap, the time, memory and CPU limits, dead kernels, isolation between sessions,
the pool's cap and idle reaping, no orphan processes, and what the bubblewrap sandbox keeps out.

Kernels start in a second or two, so sessions that survive what their tests do are shared per module."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

from glmkit.tools import sandbox as sandbox_module  # noqa: E402
from glmkit.tools.kernel import KernelPool, KernelSession, PoolFullError, python_tool  # noqa: E402
from glmkit.tools.registry import call_tool  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LIMITS = dict(timeout_s=2.5, grace_s=1.5, memory_mb=512)


def bwrap_problem() -> str | None:
    try:
        sandbox_module.check_bwrap()
    except sandbox_module.SandboxError as e:
        return str(e)
    return None



def kernel_processes() -> list[psutil.Process]:
    """This test process's descendants that are kernels or their bwrap wrappers."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "ipykernel_launcher" in cmdline or "bwrap" in cmdline:
            found.append(process)
    return found


def new_kernel_processes(before: list[psutil.Process]) -> list[psutil.Process]:
    """Kernel processes (and everything below them) started since `before` was taken."""
    old = {p.pid for p in before}
    new = [p for p in kernel_processes() if p.pid not in old]
    return new + [c for p in new for c in p.children(recursive=True)]


def wait_dead(pid: int) -> None:
    """Until our child `pid` has exited and can be collected (WNOWAIT leaves collecting it to jupyter_client)."""
    deadline = time.monotonic() + 10
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone(processes: list[psutil.Process], within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while any(map(running, processes)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture(scope="module")
def session():
    with KernelSession(**LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def boxed():
    if bwrap_problem() is not None:
        pytest.skip(f"no working bubblewrap: {bwrap_problem()}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLMKIT_TEST_SECRET", "hunter2")
        s = KernelSession(sandbox=True, **LIMITS)
    with s:
        yield s


@pytest.fixture(scope="module")
def host_server():
    """A TCP server on the host's 127.0.0.1 that accepts connections: the sandbox must not reach it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


CONNECT = "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\nprint('connected')"


# --- output -------------------------------------------------------------------------------------------------

def test_output_comes_back_in_order(session):
    obs = session.run("import sys\nprint('one')\nprint('two', file=sys.stderr)\nprint('three')\n6 * 7")
    assert not obs.error
    # ipykernel buffers stdout and stderr apart, so only the order within each, and the result last, hold
    assert obs.text.split()[-1] == "42" and obs.text.index("one") < obs.text.index("three") and "two" in obs.text
    assert session.run("x = 1").text == "(no output)"


def test_plot_with_chinese_title_is_a_png(session, monkeypatch):
    monkeypatch.setattr(session, "timeout_s", 60.0)   # importing matplotlib may take seconds on a busy machine
    obs = session.run("import matplotlib.pyplot as plt\nplt.plot([-2, -1, 0, 1], [4, 1, 0, 1])\n"
                      "plt.title('销售额（万元）')\nplt.xlabel('月份');")
    assert not obs.error, obs.text
    assert len(obs.images) == 1 and obs.images[0].png.startswith(PNG_SIGNATURE)
    assert "[image 1: <Figure" in obs.text
    assert "missing from font" not in obs.text and "findfont" not in obs.text, obs.text


def test_traceback_is_plain_and_short(session):
    obs = session.run("def down(n):\n    return 1 / 0 if n == 0 else down(n - 1)\ndown(20)")
    assert obs.error
    assert "\x1b[" not in obs.text
    assert obs.text.startswith("Traceback (most recent call last):")
    assert "frames omitted" in obs.text
    assert obs.text.rstrip().endswith("ZeroDivisionError: division by zero")
    assert len(obs.text.splitlines()) < 15, obs.text


def test_output_is_capped_with_a_note(session):
    obs = session.run("print('A' * 30000)\nprint('the end')")
    assert len(obs.text) < session.max_chars + 100
    assert "characters cut" in obs.text and obs.text.rstrip().endswith("the end")


def test_progress_bars_keep_their_last_state(session):
    obs = session.run("for i in range(100):\n    print(f'\\r{i}%', end='')\nprint()")
    assert obs.text.strip() == "99%"


# --- limits -------------------------------------------------------------------------------------------------

def test_infinite_loop_is_interrupted_and_variables_survive(session):
    session.run("kept = 41")
    start = time.monotonic()
    obs = session.run("print('before')\nwhile True:\n    pass")
    elapsed = time.monotonic() - start
    assert obs.error and "interrupted" in obs.text and "before" in obs.text
    assert "KeyboardInterrupt" not in obs.text
    assert elapsed < session.timeout_s + session.grace_s, elapsed
    assert session.run("kept + 1").text == "42"


def test_interrupt_from_another_thread_stops_the_cell(session):
    session.run("kept = 'yes'")
    threading.Timer(0.3, session.interrupt).start()
    start = time.monotonic()
    obs = session.run("import time\ntime.sleep(30)")
    assert obs.error and "interrupted on request" in obs.text, obs.text
    assert time.monotonic() - start < session.timeout_s
    assert session.run("kept").text == "'yes'"


def test_cell_ignoring_the_interrupt_gets_the_kernel_restarted(session):
    session.run("lost = 1")
    start = time.monotonic()
    obs = session.run("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass")
    elapsed = time.monotonic() - start
    assert obs.error and "restarted" in obs.text and "lost" in obs.text
    assert elapsed < session.timeout_s + session.grace_s + 10, elapsed
    assert "NameError" in session.run("lost").text
    assert session.run("1 + 1").text == "2"


def test_memory_bombs_end_in_memory_error(session):
    big = session.run("x = bytearray(10 ** 11)")
    assert big.error and "MemoryError" in big.text, big.text
    grow = session.run("chunks = []\nwhile True:\n    chunks.append(b' ' * 10 ** 7 + b'!')")
    assert grow.error and ("MemoryError" in grow.text or "restarted" in grow.text), grow.text
    session.run("chunks = None")
    assert session.run("1 + 1").text == "2"


def test_kernel_that_exits_is_restarted_and_the_model_told(session):
    session.run("lost = 1")
    obs = session.run("import os\nos._exit(1)")
    assert obs.error and "died" in obs.text and "status 1" in obs.text and "restarted" in obs.text
    assert "NameError" in session.run("lost").text


def test_kernel_killed_between_cells_is_noticed_at_the_next(session):
    pid = int(session.run("import os\nos.getpid()").text)
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)
    obs = session.run("'still here'")
    assert obs.text.startswith("[The kernel had died (killed by SIGKILL)"), obs.text
    assert "'still here'" in obs.text


def test_cpu_time_limit_kills_and_restarts():
    with KernelSession(timeout_s=30.0, cpu_s=2) as s:
        obs = s.run("while True:\n    pass")
        assert obs.error and "SIGXCPU" in obs.text and "CPU time limit of 2 s" in obs.text, obs.text
        assert s.run("1 + 1").text == "2"


# --- sessions and the pool ----------------------------------------------------------------------------------

def test_sessions_do_not_share_variables_or_files(session):
    session.run("secret = 'mine'\nopen('notes.txt', 'w').write('mine')")
    with KernelSession(**LIMITS) as other:
        assert other.workdir != session.workdir
        assert "NameError" in other.run("secret").text
        assert other.run("import os\nos.listdir('.')").text == "[]"
    assert (session.workdir / "notes.txt").read_text() == "mine"


def test_session_started_in_a_short_lived_thread_outlives_it():
    """Tools run in a thread per call, and bwrap's --die-with-parent kills the sandbox when the thread that
    started it ends: kernels must be started elsewhere."""
    made = []
    sandbox = bwrap_problem() is None
    thread = threading.Thread(target=lambda: made.append(KernelSession(sandbox=sandbox, **LIMITS)))
    thread.start()
    thread.join()
    with made[0] as s:
        s.run("x = 5")
        time.sleep(0.5)
        assert s.run("x").text == "5"


def test_pool_caps_kernels_and_reaps_idle_ones():
    before = kernel_processes()
    with KernelPool(max_kernels=2, idle_s=60.0, **LIMITS) as pool:
        pool.run("a", "x = 1")
        pool.get("b")
        with pytest.raises(PoolFullError, match="max_kernels=2"):
            pool.get("c")
        full = pool.run("c", "1")
        assert full.error and "2" in full.text
        started = new_kernel_processes(before)
        assert len(started) >= 2
        pool.idle_s = 0.5
        deadline = time.monotonic() + 10
        while len(pool) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pool) == 0
        obs = pool.run("a", "x")
        assert "closed after 0.5 s unused" in obs.text and "NameError" in obs.text
        assert not pool.run("a", "x = 2").error   # the note is told once
        assert pool.run("a", "x").text == "2"
        started += new_kernel_processes(before)
    assert gone(started)


def test_python_tool_runs_code_through_call_tool(session):
    tool = python_tool(session)
    assert tool.spec()["function"]["name"] == "python"
    assert tool.parameters["required"] == ["code"]
    assert tool.timeout_s > session.timeout_s + session.grace_s
    obs = call_tool(tool, '{"code": "print(2 ** 10)"}')
    assert obs.text.strip() == "1024" and not obs.error
    with KernelPool(max_kernels=1) as pool:
        assert call_tool(python_tool(pool, "c1"), {"code": "'c1'"}).text == "'c1'"
        assert call_tool(python_tool(pool, "c2"), {"code": "1"}).error
        with pytest.raises(ValueError, match="conversation"):
            python_tool(pool)


def test_no_kernel_outlives_close():
    before = kernel_processes()
    with KernelSession(**LIMITS) as s:
        s.run("import subprocess\nchild = subprocess.Popen(['sleep', '60'])")
        started = new_kernel_processes(before)
    assert len(started) == 2 and gone(started)   # the kernel and its `sleep`


def test_no_kernel_outlives_its_killed_server(tmp_path):
    """The server killed with SIGKILL: kernels go too (ipykernel polls its parent; bwrap --die-with-parent)."""
    sandbox = bwrap_problem() is None
    script = textwrap.dedent(f"""
        import time
        from glmkit.tools.kernel import KernelSession
        sessions = [KernelSession()] + ([KernelSession(sandbox=True)] if {sandbox} else [])
        print('ready', flush=True)
        time.sleep(60)
    """)
    # its session directories, which a killed server cannot delete, go to tmp_path
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        assert server.stdout.readline().strip() == "ready"
        kernels = psutil.Process(server.pid).children(recursive=True)
        assert len(kernels) >= 1 + sandbox
    finally:
        server.kill()
        server.wait()
    assert gone(kernels, within_s=15), [p.pid for p in kernels if running(p)]


# --- the sandbox --------------------------------------------------------------------------------------------

def test_network_reaches_the_host_without_sandbox_only(session, boxed, host_server):
    outside = session.run(CONNECT.format(port=host_server))
    inside = boxed.run(CONNECT.format(port=host_server))
    print(f"\nconnect to host 127.0.0.1:{host_server} without sandbox: {outside.text!r}"
          f"\nwith sandbox: {inside.text.splitlines()[-1]!r}")
    assert outside.text == "connected" and not outside.error
    assert inside.error and "ConnectionRefusedError" in inside.text
    dns = boxed.run("import socket\nsocket.getaddrinfo('pypi.org', 443)")
    assert dns.error and "gaierror" in dns.text


def test_sandbox_writes_only_its_working_directory(boxed, tmp_path):
    (boxed.workdir / "given.txt").write_text("from the host")
    assert boxed.run("open('given.txt').read()").text == "'from the host'"
    assert not boxed.run("open('made.txt', 'w').write('from the kernel')").error
    assert (boxed.workdir / "made.txt").read_text() == "from the kernel"
    outside = os.path.join(sys.prefix, "sandbox-probe.txt")
    obs = boxed.run(f"open({outside!r}, 'w')")
    assert obs.error and "Read-only file system" in obs.text and not os.path.exists(outside)
    # /tmp is private: the host's temporary files (other sessions' working directories) are not there
    (tmp_path / "host.txt").write_text("host")
    assert "FileNotFoundError" in boxed.run(f"open({str(tmp_path / 'host.txt')!r}).read()").text
    scratch = f"/tmp/glmkit-sandbox-scratch-{os.getpid()}"
    assert not boxed.run(f"open({scratch!r}, 'w').write('x')").error
    assert not os.path.exists(scratch)


def test_sandbox_hides_processes_run_and_environment(boxed):
    assert boxed.run("import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())").text == "[1, 2]"
    assert boxed.run("import os\nos.listdir('/run')").text == "[]"
    assert boxed.run("import os\n'GLMKIT_TEST_SECRET' in os.environ").text == "False"
    effective = boxed.run("open('/proc/self/status').read().split('CapEff:')[1].split()[0]").text
    assert effective == "'0000000000000000'"


def test_sandbox_interrupt_and_death_work_inside(boxed):
    boxed.run("kept = 7")
    obs = boxed.run("while True:\n    pass")
    assert obs.error and "interrupted" in obs.text
    assert boxed.run("kept").text == "7"
    died = boxed.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert died.error and "killed by SIGKILL" in died.text and "restarted" in died.text
    assert boxed.run("1 + 1").text == "2"


def test_missing_bwrap_is_a_clear_error_at_start(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox_module.check_bwrap.cache_clear()
    try:
        with pytest.raises(sandbox_module.SandboxError, match="bubblewrap"):
            KernelSession(sandbox=True)
    finally:
        sandbox_module.check_bwrap.cache_clear()
