"""The tools glmkit offers out of the box, as in ChatGLM3's composite demo, made safe to hand to a model.

Always on: calculator, current_time, random_number, and read_file / list_files confined to one workspace
directory. Opt-in: shell (runs arbitrary commands) and the network tools get_weather and fetch_url.
`builtin_tools(workspace, allow_shell=..., allow_network=...)` returns the set. Errors are raised with messages
meant for the model; `call_tool` turns them into error observations.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import os
import random
import re
import signal
import subprocess
from pathlib import Path
from typing import Annotated
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx

from .base import Observation, Tool
from .calculator import evaluate, format_number
from .registry import tool
from .signatures import function_tool

log = logging.getLogger("glmkit")

MAX_FILE_BYTES = 10_000_000  # read_file refuses bigger files outright
MAX_LINES = 400              # read_file shows at most this many lines per call
MAX_ENTRIES = 200            # list_files shows at most this many entries
SHELL_TIMEOUT_S = 30.0
NETWORK_TIMEOUT_S = 5.0
MAX_DOWNLOAD_BYTES = 1_000_000
RANDOM_BOUND = 10 ** 18
_BOUNDED = {"minimum": -RANDOM_BOUND, "maximum": RANDOM_BOUND}


@tool
def calculator(expression: Annotated[str, "Arithmetic such as '2**100', '(3+4)*5/2', 'sqrt(2)', 'factorial(20)'"]
               ) -> str:
    """Evaluate an arithmetic expression exactly (integers never lose digits). Supports + - * / // % ** (or ^),
    parentheses, sqrt, sin, cos, tan, log, log10, log2, exp, abs, round, floor, ceil, factorial, pi and e."""
    return format_number(evaluate(expression))


@tool
def current_time(timezone: Annotated[str | None, "IANA time zone such as 'Asia/Shanghai' or 'UTC'; "
                                                 "omitted: the local time of the machine"] = None) -> str:
    """The current date, time and weekday."""
    if timezone is None:
        now = dt.datetime.now().astimezone()
    else:
        try:
            now = dt.datetime.now(ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as 'Asia/Shanghai', "
                             "'America/New_York' or 'UTC'") from None
    return f"{now:%Y-%m-%d %H:%M:%S} {now:%A}, {timezone or 'local time'} (UTC{now:%z})"


@tool
def random_number(low: Annotated[int, "Smallest possible value", _BOUNDED] = 0,
                  high: Annotated[int, "Largest possible value", _BOUNDED] = 100,
                  seed: Annotated[int | None, "Seed, for a repeatable number"] = None) -> int:
    """A random integer between low and high, both included."""
    if low > high:
        raise ValueError(f"low={low} is greater than high={high}")
    return random.Random(seed).randint(low, high)


def workspace_tools(workspace: Path) -> list[Tool]:
    """read_file and list_files, confined to `workspace`: every path is resolved (symlinks followed) and refused
    when it lands outside. A symlink swapped between the check and the read could still escape; the workspace
    is meant for the user's own files, not as a boundary against a hostile local user."""
    root = Path(workspace).resolve()

    def inside(path: str) -> Path:
        target = (root / path).resolve()
        if target != root and root not in target.parents:
            raise PermissionError(f"{path!r} is outside the workspace; use a path relative to it")
        return target

    def read_file(path: Annotated[str, "File path, relative to the workspace"],
                  start_line: Annotated[int, "First line to show (1 = the start)", {"minimum": 1}] = 1) -> str:
        """Read a text file of the workspace, up to 400 lines from start_line (call again to read on)."""
        target = inside(path)
        if not target.is_file():
            raise FileNotFoundError(f"{path!r} is a directory; use list_files" if target.is_dir()
                                    else f"no file {path!r} in the workspace")
        size = target.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path!r} has {size:,} bytes; files over {MAX_FILE_BYTES:,} bytes are not read")
        data = target.read_bytes()
        text = _decode(data)
        if text is None:
            return f"{path!r} is a binary file ({size:,} bytes); not shown"
        lines = text.splitlines()
        shown = lines[start_line - 1:start_line - 1 + MAX_LINES]
        last = start_line + len(shown) - 1
        if not shown:
            return f"{path} has {len(lines)} lines; start_line {start_line} is past the end"
        return "\n".join([f"{path} (lines {start_line}-{last} of {len(lines)})", *shown])

    def list_files(path: Annotated[str, "Directory, relative to the workspace"] = ".",
                   recursive: Annotated[bool, "Also list subdirectories' contents"] = False) -> str:
        """List a workspace directory: files with their sizes, directories ending in '/'."""
        target = inside(path)
        if not target.is_dir():
            raise NotADirectoryError(f"{path!r} is not a directory of the workspace")
        entries = []
        for folder, dirs, files in os.walk(target):
            dirs.sort()
            for name in dirs:
                entries.append(f"{Path(folder, name).relative_to(root)}/")
            for name in sorted(files):
                file = Path(folder, name)
                size = f"{file.stat().st_size:,} bytes" if file.exists() else "broken link"
                entries.append(f"{file.relative_to(root)} ({size})")
            if not recursive or len(entries) > MAX_ENTRIES:
                break
        hidden = len(entries) - MAX_ENTRIES  # a recursive listing stops walking there: at least that many
        more = f"\n[... {'at least ' if recursive else ''}{hidden} more entries not shown]" if hidden > 0 else ""
        return "\n".join(entries[:MAX_ENTRIES]) + more if entries else f"{path!r} is empty"

    return [function_tool(read_file), function_tool(list_files)]


def shell_tool(workspace: Path, timeout_s: float = SHELL_TIMEOUT_S) -> Tool:
    """`shell`: runs a command with /bin/sh in `workspace`, killed (with its children) after `timeout_s`. It runs
    ANY command with the user's rights, so it is off unless asked for, and enabling it is logged."""
    cwd = Path(workspace).resolve()
    log.warning("tool 'shell' enabled: the model can run arbitrary commands as this user in %s", cwd)

    def shell(command: Annotated[str, "Shell command line"]) -> Observation:
        """Run a shell command in the workspace and return its exit code and output. WARNING: runs arbitrary
        commands with the user's rights."""
        process = subprocess.Popen(command, shell=True, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            text = output.decode(errors="replace")
            return Observation(f"killed after {timeout_s:g} s\n{text}", error=True)
        text = output.decode(errors="replace")
        return Observation(f"exit code {process.returncode}\n{text}", error=process.returncode != 0)

    return function_tool(shell, timeout_s=timeout_s + 5)


def network_tools(weather_url: str = "https://wttr.in", timeout_s: float = NETWORK_TIMEOUT_S) -> list[Tool]:
    """get_weather (wttr.in's JSON, as ChatGLM3's demo) and fetch_url. `timeout_s` bounds each step of a request
    (connecting, each read), the tool call about three times that; without a network they fail with an error
    saying so. fetch_url reaches whatever this machine reaches,
    local addresses included: offer it only where that is acceptable."""

    def get(url: str, **params) -> httpx.Response:
        try:
            with httpx.stream("GET", url, params=params, timeout=timeout_s, follow_redirects=True) as response:
                body = b""
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_DOWNLOAD_BYTES:
                        break
                return httpx.Response(response.status_code, headers=response.headers, content=body,
                                      request=response.request)
        except httpx.HTTPError as e:
            raise ConnectionError(f"could not get {url} ({type(e).__name__}: {e or 'no details'}); "
                                  "the network may be unavailable") from None

    def get_weather(city: Annotated[str, "City name, e.g. 'Beijing' or '北京'"]) -> dict:
        """Current weather of a city: temperature, feels-like, humidity and conditions."""
        response = get(f"{weather_url.rstrip('/')}/{quote(city)}", format="j1")
        if response.status_code != 200:
            raise ConnectionError(f"the weather service answered HTTP {response.status_code} for {city!r}")
        try:
            now = response.json()["current_condition"][0]
            return {"city": city, "temperature_c": now["temp_C"], "feels_like_c": now["FeelsLikeC"],
                    "humidity_percent": now["humidity"], "conditions": now["weatherDesc"][0]["value"],
                    "observed_at": now.get("localObsDateTime") or now.get("observation_time")}
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"the weather service gave no weather for {city!r}") from None

    def fetch_url(url: Annotated[str, "http:// or https:// address"]) -> str:
        """Fetch a web page and return its text (HTML tags removed)."""
        if not re.match(r"https?://", url, re.IGNORECASE):
            raise ValueError(f"{url!r} is not an http:// or https:// address")
        response = get(url)
        kind = response.headers.get("content-type", "")
        status = f"HTTP {response.status_code} {url}\n"
        if kind and not re.match(r"text/|application/(json|xml|xhtml)", kind):
            return f"{status}{kind} content ({len(response.content):,} bytes), not text; not shown"
        return status + (_strip_html(response.text) if "html" in kind else response.text)

    return [function_tool(get_weather, timeout_s=3 * timeout_s), function_tool(fetch_url, timeout_s=3 * timeout_s)]


def builtin_tools(workspace: Path, allow_shell: bool = False, allow_network: bool = False) -> list[Tool]:
    """The built-in tools: calculator, current_time, random_number, read_file, list_files; with `allow_shell`
    also shell, with `allow_network` also get_weather and fetch_url. `workspace` must be an existing directory."""
    if not Path(workspace).is_dir():
        raise NotADirectoryError(f"the tools' workspace {workspace} is not a directory; create it or pick another")
    tools = [calculator.tool, current_time.tool, random_number.tool, *workspace_tools(workspace)]
    if allow_shell:
        tools.append(shell_tool(workspace))
    if allow_network:
        tools.extend(network_tools())
    return tools


def _decode(data: bytes) -> str | None:
    """The text of a file (UTF-8, else GB18030 as Chinese Windows saves it), or None for a binary file."""
    if b"\0" in data[:8192]:
        return None
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return None


def _strip_html(page: str) -> str:
    """The readable text of an HTML page: scripts, styles, comments and tags dropped, blank runs squeezed."""
    page = re.sub(r"(?is)<(script|style)\b.*?</\1>|<!--.*?-->", " ", page)
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    return re.sub(r"\s*\n\s*", "\n", re.sub(r"[ \t\r\f\v\xa0]+", " ", text)).strip()
