"""Bubblewrap (bwrap) around a code-interpreter kernel: `KernelSession(sandbox=True)` starts its kernel under
`bwrap_command(...)`. The kernel still talks to jupyter_client, over ZMQ IPC sockets (Unix socket files in the
session's runtime directory, bound into the sandbox), so it needs no network at all.

What the sandbox isolates (measured on Linux 6.18 with bubblewrap 0.8.0, the server running as root;
tests/test_code_interpreter.py checks the network, writing, /tmp, /proc, /run, the environment and the
capabilities):
- Network: a new network namespace (--unshare-net) holding only its own loopback. A TCP connection to a server
  listening on the host's 127.0.0.1 is refused, other addresses are unreachable, DNS fails; the host's abstract
  Unix sockets are out of reach too.
- Writing: the host's filesystem is mounted read-only (--ro-bind / /). Writable are only the working directory,
  the runtime directory (connection file and IPC sockets) and private tmpfs mounts on /tmp, /var/tmp and
  /dev/shm (TMPFS_BYTES each, held in memory, gone when the kernel stops): the host's /tmp, with other
  sessions' working directories, is not visible.
- Reading: /home, /root and /run are hidden behind empty read-only tmpfs mounts (the Python installation is
  bound back read-only where it lives under them); /run holds the host's service sockets (D-Bus, Docker).
- Processes: own PID namespace (--unshare-pid) and /proc, so the kernel sees and signals only its own
  processes; a minimal /dev (--dev); own IPC and UTS namespaces; its own session (--new-session); killed with
  its parent (--die-with-parent), so no kernel outlives the server.
- Privileges: a user namespace (--unshare-user) and --cap-drop ALL: no capabilities, even when the server runs
  as root.
- Environment: --clearenv: the kernel sees only the few variables `bwrap_command` passes (PATH, LANG, ...),
  not the server's API keys or tokens.

What it does not isolate:
- Reading: every other file the server's user can read (/etc, /opt, /srv, /var, model files, the project
  directory) is readable; read-only is not invisible.
- Unix socket files outside /run, /tmp and the hidden home directories stay connectable: a read-only mount
  does not stop connect().
- Resources: memory and CPU time are bounded by rlimits (kernel.py), not cgroups; the number of processes
  (a fork bomb) and the bytes written into the working directory are not bounded, and the tmpfs mounts take
  up to 3 x TMPFS_BYTES of memory beside the kernel's own limit.
- The Linux kernel itself: there is no seccomp filter, so a kernel exploit escapes.
"""

from __future__ import annotations

import functools
import os
import shutil
import site
import subprocess
import sys

from ..errors import GlmkitError

TMPFS_BYTES = 256 * 2 ** 20    # the size cap of each private writable tmpfs (/tmp, /var/tmp, /dev/shm)
HIDDEN = ("/home", "/root", "/run")
PRIVATE = ("/tmp", "/var/tmp", "/dev/shm")
KEPT_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


class SandboxError(GlmkitError, RuntimeError):
    """sandbox=True was asked for, but bubblewrap is missing or does not work on this machine."""


def bwrap_command(writable: list[str], env: dict[str, str]) -> list[str]:
    """The bwrap argv prefix (the command to run follows it): `writable` directories bound read-write at their
    own paths, `env` the kernel's whole environment (besides KEPT_ENV taken from this process)."""
    cmd = ["bwrap", "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--cap-drop", "ALL", "--new-session", "--die-with-parent",
           "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    hidden = [path for path in HIDDEN if os.path.isdir(path)]
    for path in hidden:
        cmd += ["--tmpfs", path]
    for path in PRIVATE:
        cmd += ["--size", str(TMPFS_BYTES), "--tmpfs", path]
    for path in _python_dirs():
        cmd += ["--ro-bind", path, path]
    for path in writable:
        cmd += ["--bind", path, path]
    for path in hidden:   # last: the binds above need their mount points made in these
        cmd += ["--remount-ro", path]
    cmd += ["--clearenv"]
    kept = {name: os.environ[name] for name in KEPT_ENV if name in os.environ}
    for name, value in {**kept, "HOME": "/tmp", **env}.items():
        cmd += ["--setenv", name, value]
    return cmd + ["--"]


@functools.cache
def check_bwrap() -> None:
    """Raise SandboxError saying why when bwrap is missing or cannot build this sandbox here (checked once per
    process, by running Python inside it)."""
    if shutil.which("bwrap") is None:
        raise SandboxError("sandbox=True needs bubblewrap, and `bwrap` is not on PATH "
                           "(install it: apt install bubblewrap / dnf install bubblewrap)")
    cmd = bwrap_command([], {}) + [sys.executable, "-c", "pass"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxError(f"bwrap could not be run: {e}") from None
    if done.returncode != 0:
        raise SandboxError(f"bwrap does not work on this machine (exit status {done.returncode}): "
                           f"{done.stderr.strip()[-500:]}. Unprivileged user namespaces may be disabled "
                           "(sysctl kernel.unprivileged_userns_clone, or AppArmor's "
                           "kernel.apparmor_restrict_unprivileged_userns on Ubuntu 24.04)")


def _python_dirs() -> list[str]:
    """This Python's installation directories that lie under a hidden directory (to bind back read-only)."""
    paths = [sys.prefix, sys.base_prefix, os.path.dirname(sys.executable), *site.getsitepackages(),
             site.getusersitepackages()]
    paths = {*paths, *map(os.path.realpath, paths)}
    hidden = [h + "/" for h in HIDDEN]
    return sorted(p for p in paths if os.path.isdir(p) and any(p.startswith(h) for h in hidden))
