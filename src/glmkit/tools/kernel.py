"""The code interpreter: Python the model writes runs in a Jupyter kernel of its own conversation.

ChatGLM3's composite demo ran every browser session's code in one shared kernel, without limits. Here a
`KernelSession` is one ipykernel process (this Python, `sys.executable`) for one conversation, never shared,
with its own working directory, and `run(code)` returns an `Observation`: stdout/stderr, results, a short
traceback and plots (PNG `Image`s beside a "[image N: ...]" line) in the order they came (ipykernel buffers
stdout and stderr apart, so lines of the two may swap), capped at `max_chars`.

Limits of each session:
- Wall time per cell (`timeout_s`): the kernel is interrupted (KeyboardInterrupt, variables kept); if it does
  not stop within `grace_s` it is restarted (variables lost). The observation says which happened.
  `interrupt()` (the user pressed stop) does the same before the time is up.
- Memory (`memory_mb`): RLIMIT_DATA on the kernel process, so a cell that allocates too much gets a
  MemoryError instead of taking the host down. CPU time (`cpu_s`): RLIMIT_CPU, which counts the kernel
  process's whole life, not one cell (an rlimit cannot be raised again without privileges); a kernel that
  uses it up is killed, restarted, and the observation says so. Child processes inherit both limits.
- A kernel that dies for any reason is noticed and restarted, and the model is told its variables are gone.
- `sandbox=True` starts the kernel under bubblewrap; sandbox.py says what that does and does not isolate.
  Without it the kernel has the server's user, files, network and environment (API keys included): the
  limits above hold, but nothing is kept from the code.

The kernel talks to jupyter_client over ZMQ IPC sockets in a private runtime directory (mode 0700), not TCP
ports on 127.0.0.1: other local users cannot reach it, and a sandboxed kernel needs no network at all.
`KernelPool` keeps sessions by conversation id, caps their number and closes idle ones; `python_tool` makes
either into an ordinary tool named `python`.
"""

from __future__ import annotations

import base64
import functools
import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

from ..errors import GlmkitError
from .base import Closeable, Image, Observation, Tool
from .sandbox import bwrap_command, check_bwrap

TIMEOUT_S = 30.0
GRACE_S = 5.0
MEMORY_MB = 2048
CPU_S = 600
MAX_CHARS = 8000
STARTUP_S = 60.0    # a kernel that is not ready by then failed to start
POLL_S = 0.1        # how often a waiting run checks the clock and whether the kernel is alive
REAP_EVERY_S = 1.0  # how often a pool looks for idle sessions
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Source Han Sans SC",
             "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Runs first in the kernel's process: set the rlimits, then become ipykernel (so they bind the kernel itself).
LAUNCH = """\
import os, resource, sys
memory, cpu = int(sys.argv[1]), int(sys.argv[2])
if memory:
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
if cpu:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *sys.argv[3:]])
"""
# bwrap's --die-with-parent ties a sandbox to the *thread* that started it (PR_SET_PDEATHSIG), and tools run in
# short-lived threads (registry.call_tool starts one per call): every kernel is started from this one thread.
SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glmkit-kernel-spawner")
KERNEL_ARGS = ["-f", "{connection_file}", "--InteractiveShell.colors=nocolor", "--InteractiveShell.xmode=Plain"]


class KernelError(GlmkitError, RuntimeError):
    """A kernel could not be started; the message carries the end of its log."""


class PoolFullError(GlmkitError, RuntimeError):
    """A KernelPool already runs as many kernels as it may."""


class KernelSession(Closeable):
    """One Jupyter kernel for one conversation, started at once (errors surface here, not at the first cell).

    `workdir` is the kernel's working directory (a new temporary one, deleted on close, when not given).
    `run` may be called from any thread; calls to one session run one at a time."""

    def __init__(self, workdir: str | Path | None = None, *, sandbox: bool = False, timeout_s: float = TIMEOUT_S,
                 grace_s: float = GRACE_S, memory_mb: int | None = MEMORY_MB, cpu_s: int | None = CPU_S,
                 max_chars: int = MAX_CHARS):
        if sandbox:
            check_bwrap()
        self.sandbox, self.timeout_s, self.grace_s = sandbox, timeout_s, grace_s
        self.memory_mb, self.cpu_s, self.max_chars = memory_mb, cpu_s, max_chars
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="glmkit-work-")).resolve()
        self._rundir = Path(tempfile.mkdtemp(prefix="glmkit-kernel-"))
        self._lock = threading.Lock()
        self._closed = False
        self._interrupt_asked = False
        self._notes: list[str] = []   # told to the model at the start of the next observation
        self._km: KernelManager | None = None
        self._kc = None
        self.last_used = time.monotonic()
        try:
            self._write_spec()
            self._start()
        except BaseException:
            self.close()
            raise

    def run(self, code: str) -> Observation:
        """Run one cell and return what it printed, showed and raised, or why it was stopped."""
        with self._lock:
            self.last_used = time.monotonic()
            self._interrupt_asked = False
            try:
                if self._closed:
                    return Observation("This Python session has been closed.", error=True)
                if self._km is None or not self._km.is_alive():   # it died between cells, or a restart failed
                    reason = self._exit_reason() if self._km is not None else "a restart had failed"
                    self._notes.append(f"[The kernel had died ({reason}) and was restarted: variables and "
                                       "imports from earlier cells are lost.]")
                    self._restart()
                notes, self._notes = self._notes, []
                observation = self._execute(code)
                observation.text = "\n".join([*notes, observation.text]).strip() or "(no output)"
                return observation
            finally:
                self.last_used = time.monotonic()

    def interrupt(self) -> None:
        """Interrupt the running cell, if any (the user pressed stop; callable from any thread): it ends as a
        timed-out cell does, variables kept. The running `run` sends the interrupt itself, so that the kernel's
        sockets are only used from one thread."""
        self._interrupt_asked = True

    def close(self) -> None:
        """Stop the kernel (waiting for a running cell to notice) and delete the session's directories."""
        self._closed = True
        with self._lock:
            self._stop()
            shutil.rmtree(self._rundir, ignore_errors=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def busy(self) -> bool:
        """A cell is running."""
        return self._lock.locked()


    # --- the kernel process -------------------------------------------------------------------------------

    def _write_spec(self) -> None:
        """A kernelspec of our own: the rlimit launcher (under bwrap when sandboxed), message-mode interrupts
        (a signal to bwrap would not reach the kernel), and the environment matplotlib needs."""
        mpl = self._rundir / "mpl"
        mpl.mkdir()
        font_caches, rc = _matplotlib_setup()
        for cache in font_caches:   # skips the seconds-long font scan of a new MPLCONFIGDIR
            shutil.copy(cache, mpl)
        (mpl / "matplotlibrc").write_text(rc)
        env = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "MPLCONFIGDIR": str(mpl),
               "IPYTHONDIR": str(self._rundir / "ipython")}
        memory = (self.memory_mb or 0) * 2 ** 20
        argv = [sys.executable, "-c", LAUNCH, str(memory), str(self.cpu_s or 0), *KERNEL_ARGS]
        if self.sandbox:
            argv = bwrap_command([str(self.workdir), str(self._rundir)], env) + argv
        spec = self._rundir / "kernels" / "glmkit"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": argv, "env": env, "display_name": "glmkit", "language": "python",
            "interrupt_mode": "message"}))

    def _start(self) -> None:
        specs = KernelSpecManager(kernel_dirs=[str(self._rundir / "kernels")])
        self._km = KernelManager(kernel_name="glmkit", kernel_spec_manager=specs, transport="ipc",
                                 connection_file=str(self._rundir / "kernel.json"))
        log = self._rundir / "kernel.log"
        with open(log, "ab") as stderr:
            # independent: no JPY_PARENT_PID; inside bwrap's PID namespace ipykernel would take its parent
            # (bwrap's pid 1) for a dead one and quit. bwrap's --die-with-parent does that job there.
            SPAWNER.submit(self._km.start_kernel, cwd=str(self.workdir), independent=self.sandbox,
                           stdout=subprocess.DEVNULL, stderr=stderr).result()
        self._kc = self._km.client()
        self._kc.start_channels(hb=False)
        try:
            self._kc.wait_for_ready(timeout=STARTUP_S)
        except RuntimeError as e:
            tail = log.read_text(errors="replace")[-1500:].strip()
            self._stop()
            raise KernelError(f"the Python kernel did not start ({e}); its log ends with:\n{tail}") from None

    def _stop(self) -> None:
        if self._kc is not None:
            self._kc.stop_channels()
            self._kc = None
        if self._km is not None:
            if self._km.has_kernel:
                self._km.shutdown_kernel(now=True)
            self._km = None

    def _restart(self) -> None:
        self._stop()
        self._start()

    def _exit_reason(self) -> str:
        process = getattr(self._km.provisioner, "process", None)
        code = process.poll() if process is not None else None
        if code is None:
            return "no exit status"
        number = -code if code < 0 else code - 128 if self.sandbox and code > 128 else None  # bwrap: 128+signal
        if number is None:
            return f"it exited with status {code}"
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGXCPU:
            return f"{name}: it used up its CPU time limit of {self.cpu_s} s"
        return f"killed by {name}"

    # --- one cell -----------------------------------------------------------------------------------------

    def _execute(self, code: str) -> Observation:
        while True:   # shell replies are not needed (iopub's idle status ends a cell): drop them
            try:
                self._kc.get_shell_msg(timeout=0)
            except queue.Empty:
                break
        msg_id = self._kc.execute(code, allow_stdin=False)
        out = _Output(self.max_chars)
        images: list[Image] = []
        error = False
        interrupted, cause = None, ""
        deadline = time.monotonic() + self.timeout_s
        while True:
            now = time.monotonic()
            if self._closed:
                out.add("\n[The session was closed while this cell ran.]")
                return Observation(out.text(), error=True, images=images)
            if interrupted is None and (now > deadline or self._interrupt_asked):
                cause = ("the cell was interrupted on request" if self._interrupt_asked
                         else f"the cell ran past its {self.timeout_s:g} s time limit")
                self._km.interrupt_kernel()
                interrupted = now
            elif interrupted is not None and now > interrupted + self.grace_s:
                self._restart()
                out.add(f"\n[Stopped: {cause}, and it did not stop within {self.grace_s:g} s of an interrupt, so "
                        "the kernel was restarted: variables and imports from earlier cells are lost; files in "
                        "the working directory are kept.]")
                return Observation(out.text(), error=True, images=images)
            try:
                msg = self._kc.get_iopub_msg(timeout=POLL_S)
            except queue.Empty:
                if not self._km.is_alive():
                    reason = self._exit_reason()
                    self._restart()
                    out.add(f"\n[The kernel died while running this cell ({reason}). It was restarted: variables "
                            "and imports from earlier cells are lost; files in the working directory are kept.]")
                    return Observation(out.text(), error=True, images=images)
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind == "stream":
                out.add(content["text"])
            elif kind in ("execute_result", "display_data"):
                text = content["data"].get("text/plain", "")
                if "image/png" in content["data"]:
                    images.append(Image(base64.b64decode(content["data"]["image/png"]), alt=text))
                    text = f"[image {len(images)}: {text}]"
                out.add(text + "\n" if text else "")
            elif kind == "error" and not (interrupted and content["ename"] == "KeyboardInterrupt"):
                error = True
                out.add(_traceback(content["traceback"]))
        if interrupted is not None:
            error = True
            out.add(f"\n[Stopped: {cause}; it was interrupted, and variables from earlier cells are kept.]")
        return Observation(out.text(), error=error, images=images)


class KernelPool(Closeable):
    """Sessions by conversation id, for a server that chats with many users: at most `max_kernels` live at
    once, each closed after `idle_s` seconds unused (by a background thread); `session_options` go to each
    KernelSession. A conversation whose kernel was closed for idleness gets a new one, and is told so."""

    def __init__(self, max_kernels: int = 4, idle_s: float = 900.0, **session_options):
        if "workdir" in session_options:
            raise ValueError("KernelPool gives each session a working directory of its own; pass no workdir")
        self.max_kernels, self.idle_s, self.session_options = max_kernels, idle_s, session_options
        self._sessions: dict[str, KernelSession] = {}
        self._reaped: set[str] = set()
        self._starting = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="kernel-reaper", daemon=True)
        self._reaper.start()

    def get(self, conversation_id: str) -> KernelSession:
        """The conversation's session, started when it has none. Raises PoolFullError at the cap."""
        with self._lock:
            if self._stop.is_set():
                raise RuntimeError("this KernelPool is closed")
            session = self._sessions.get(conversation_id)
            if session is not None:
                session.last_used = time.monotonic()
                return session
            if len(self._sessions) + self._starting >= self.max_kernels:
                raise PoolFullError(
                    f"no Python kernel is free: all {self.max_kernels} allowed (KernelPool max_kernels="
                    f"{self.max_kernels}) are in use by other conversations; an idle one is closed after "
                    f"{self.idle_s:g} s")
            self._starting += 1
        try:
            session = KernelSession(**self.session_options)
        finally:
            with self._lock:
                self._starting -= 1
        with self._lock:
            other, closed = self._sessions.get(conversation_id), self._stop.is_set()
            if other is None and not closed:
                self._sessions[conversation_id] = session
                if conversation_id in self._reaped:
                    self._reaped.discard(conversation_id)
                    session._notes.append(f"[This conversation's previous kernel was closed after {self.idle_s:g} "
                                          "s unused: variables, imports and files from earlier cells are lost.]")
                return session
        session.close()   # the pool was closed meanwhile, or another thread started this conversation's kernel
        if closed:
            raise RuntimeError("this KernelPool is closed")
        return other

    def run(self, conversation_id: str, code: str) -> Observation:
        """Run a cell in the conversation's kernel; a full pool is an error observation, not an exception."""
        try:
            session = self.get(conversation_id)
        except PoolFullError as e:
            return Observation(str(e), error=True)
        return session.run(code)

    def close_session(self, conversation_id: str) -> None:
        """Close the conversation's kernel now (the conversation ended)."""
        with self._lock:
            session = self._sessions.pop(conversation_id, None)
        if session is not None:
            session.close()

    def reap(self) -> list[str]:
        """Close the sessions unused for `idle_s` seconds (not those running a cell); their ids."""
        now = time.monotonic()
        with self._lock:
            idle = [cid for cid, s in self._sessions.items() if not s.busy and now - s.last_used > self.idle_s]
            sessions = [self._sessions.pop(cid) for cid in idle]
            self._reaped.update(idle)
        for session in sessions:
            session.close()
        return idle

    def close(self) -> None:
        """Close every session and stop the reaper."""
        self._stop.set()
        self._reaper.join()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()

    def __len__(self) -> int:
        return len(self._sessions)


    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_EVERY_S):
            self.reap()


def python_tool(kernel: KernelSession | KernelPool, conversation_id: str | None = None) -> Tool:
    """The interpreter as a tool named `python` taking {"code": string}: a session, or a pool and the id of
    the conversation the tool is handed to."""
    if isinstance(kernel, KernelPool):
        if conversation_id is None:
            raise ValueError("python_tool(pool, conversation_id): a pool needs the conversation's id")
        options = kernel.session_options
        timeout_s, grace_s = options.get("timeout_s", TIMEOUT_S), options.get("grace_s", GRACE_S)
        sandbox = options.get("sandbox", False)

        def run(code: str) -> Observation:
            return kernel.run(conversation_id, code)
    else:
        timeout_s, grace_s, sandbox, run = kernel.timeout_s, kernel.grace_s, kernel.sandbox, kernel.run
    description = ("Run Python code in a Jupyter kernel kept for this conversation: variables, imports and "
                   "files persist between calls. The working directory holds the conversation's files. Print "
                   "what you want to see, or end with an expression; matplotlib plots are shown to the user "
                   f"(Chinese labels work). Each call may run {timeout_s:g} s"
                   + ("; there is no network access." if sandbox else "."))
    parameters = {"type": "object", "additionalProperties": False, "required": ["code"],
                  "properties": {"code": {"type": "string", "description": "the Python code to run"}}}
    # the tool's own bound leaves room for an interrupt, its grace period and two kernel starts
    return Tool("python", description, parameters, run, timeout_s=timeout_s + grace_s + 2 * STARTUP_S)


class _Output:
    """A cell's text as it arrives, in bounded memory: the first three quarters of `max_chars` and the last
    quarter are kept, with a note of how much was cut between them."""

    def __init__(self, max_chars: int):
        self.head_max, self.tail_max = max_chars * 3 // 4, max_chars - max_chars * 3 // 4
        self.head, self.tail, self.cut = "", "", 0

    def add(self, text: str) -> None:
        room = self.head_max - len(self.head)
        self.head, text = self.head + text[:room], text[room:]
        self.tail += text
        if len(self.tail) > self.tail_max:
            self.cut += len(self.tail) - self.tail_max
            self.tail = self.tail[len(self.tail) - self.tail_max:]

    def text(self) -> str:
        text = self.head + (f"\n[... {self.cut:,} characters cut ...]\n" if self.cut else "") + self.tail
        return re.sub(r"[^\n]*\r(?!\n)", "", ANSI.sub("", text))   # progress bars: keep what \r left shown


def _traceback(lines: list[str]) -> str:
    """A plain traceback (the first frame, the last three, the exception), without colour codes."""
    lines = [ANSI.sub("", line) for line in lines]
    if len(lines) > 6:   # header, frames..., "Error: message"
        lines = [*lines[:2], f"  ... {len(lines) - 6} frames omitted ...\n", *lines[-4:]]
    return "".join(lines)


@functools.cache
def _matplotlib_setup() -> tuple[list[Path], str]:
    """This machine's matplotlib font caches (copied into each kernel's MPLCONFIGDIR) and a matplotlibrc
    putting the CJK fonts installed here first among the sans-serif fonts (matplotlib draws a text with the
    first one it finds), so Chinese labels render instead of warning about missing glyphs. Looked up once,
    in this process: a kernel would pay seconds for it at every start."""
    try:
        import matplotlib
        from matplotlib import font_manager
    except ImportError:
        return [], ""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    cjk = [name for name in CJK_FONTS if name in installed]
    rc = f"font.sans-serif: {', '.join(cjk)}, DejaVu Sans\n" if cjk else ""
    return sorted(Path(matplotlib.get_cachedir()).glob("fontlist-*.json")), rc
