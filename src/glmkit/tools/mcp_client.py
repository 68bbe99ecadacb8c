"""Tools from MCP servers: `glmkit chat --mcp-config ~/.config/glmkit/mcp.json`.

The config is the `mcpServers` file Claude Desktop and LM Studio read: a server with a "command" is run as a
subprocess and spoken to over stdio, one with a "url" over streamable HTTP (or the older SSE transport when its
"type" says "sse"). `McpTools` connects to them all with the `mcp` SDK (2.x) and offers each server tool as a
`base.Tool` named `server__tool`. The SDK is async and the agent loop is not, so one background thread runs an event
loop that owns every connection; a tool call crosses over with `run_coroutine_threadsafe` and waits with a timeout.

A server that cannot start is logged and left out; one that dies later answers its calls with an error observation
and drops out of `tools()`. `close()` (or leaving the `with` block) shuts the connections and stdio processes down.
A stdio server's stderr goes to a temporary file, not the terminal (where it would mix with the chat); its last
lines are quoted when the server fails.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import json
import logging
import re
import tempfile
import threading
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx2
from mcp import Client, Implementation, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT, CallToolResult

from .. import __version__
from ..errors import GlmkitError, excerpt
from .base import Closeable, Image, Observation, Tool

log = logging.getLogger("glmkit")

TRANSPORTS = {"stdio": "stdio", "http": "http", "streamable-http": "http", "streamableHttp": "http", "sse": "sse"}
NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
MAX_NAME = 64  # OpenAI's limit on a function name
STDERR_TAIL_LINES = 3


class McpConfigError(GlmkitError, ValueError):
    """The MCP config file cannot be used as written; the message names the file, the server and the field."""


@dataclass
class ServerConfig:
    """One `mcpServers` entry: a command to run (transport "stdio"; `env` is added to the few variables the SDK
    passes on: HOME, PATH, SHELL, TERM, USER, LOGNAME) or a URL to connect to ("http" or "sse")."""
    name: str
    transport: str
    command: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)


def load_config(path: str | Path) -> list[ServerConfig]:
    """The servers of an `mcpServers` JSON file, checked (McpConfigError says what is wrong and where)."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise McpConfigError(f"{path}: cannot read the MCP config: {error.strerror}") from None
    except ValueError as error:
        raise McpConfigError(f"{path}: not valid JSON: {error}") from None
    return parse_config(data, str(path))


def parse_config(data, source: str = "MCP config") -> list[ServerConfig]:
    """Check a parsed `{"mcpServers": {name: {...}}}` object. Entries with `"disabled": true` are skipped; keys
    other clients add (autoApprove, timeout, ...) are ignored."""
    if not isinstance(data, dict) or not isinstance(data.get("mcpServers"), dict):
        raise McpConfigError(f'{source}: expected an object {{"mcpServers": {{"name": {{"command": ...}} or '
                             f'{{"url": ...}}}}}}, got {excerpt(data)}')
    servers = []
    for name, entry in data["mcpServers"].items():
        where = f"{source}: mcpServers.{name}"
        if not name.strip():
            raise McpConfigError(f"{source}: mcpServers has a server with an empty name")
        if not isinstance(entry, dict):
            raise McpConfigError(f"{where}: expected an object with a \"command\" or a \"url\", got {excerpt(entry)}")
        if entry.get("disabled") is True:
            continue
        servers.append(_server_config(name, entry, where))
    return servers


def _server_config(name: str, entry: dict, where: str) -> ServerConfig:
    hint_key = "type" if "type" in entry else "transport"
    hint = entry.get(hint_key)
    if hint is None:
        if ("command" in entry) == ("url" in entry):
            raise McpConfigError(f'{where}: needs either "command" (a program to run, spoken to over stdio) or '
                                 f'"url" (a streamable HTTP endpoint)')
        transport = "stdio" if "command" in entry else "http"
    elif isinstance(hint, str) and hint in TRANSPORTS:
        transport = TRANSPORTS[hint]
    else:
        raise McpConfigError(f"{where}.{hint_key}: expected one of {', '.join(TRANSPORTS)}, got {excerpt(hint)}")
    wanted, unwanted = ("command", "url") if transport == "stdio" else ("url", "command")
    if unwanted in entry:
        raise McpConfigError(f'{where}: a server of type {transport} takes "{wanted}", not "{unwanted}"')
    value = entry.get(wanted)
    if not isinstance(value, str) or not value.strip():
        raise McpConfigError(f"{where}.{wanted}: expected a non-empty string, got {excerpt(value)}")
    if transport == "stdio":
        args = entry.get("args", [])
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise McpConfigError(f"{where}.args: expected a list of strings, got {excerpt(args)}")
        return ServerConfig(name, transport, command=value, args=args, env=_strings(entry, "env", where))
    if not value.startswith(("http://", "https://")):
        raise McpConfigError(f"{where}.url: expected an http:// or https:// URL, got {excerpt(value)}")
    return ServerConfig(name, transport, url=value, headers=_strings(entry, "headers", where))


def _strings(entry: dict, key: str, where: str) -> dict[str, str]:
    value = entry.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise McpConfigError(f"{where}.{key}: expected an object of strings, got {excerpt(value)}")
    return value


def tool_names(pairs: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """`server__tool` for each (server, tool) pair, valid for OpenAI (`^[A-Za-z0-9_.-]{1,64}$`): other characters
    become "_", and a name that is too long or would clash gets a hash of the pair in place of its tail, so the
    same config always gives the same names."""
    plain = {pair: NAME_CHARS.sub("_", f"{pair[0]}__{pair[1]}") for pair in pairs}
    counts = Counter(plain.values())
    names = {}
    for pair, name in plain.items():
        if len(name) > MAX_NAME or counts[name] > 1:
            name = f"{name[:MAX_NAME - 9]}_{hashlib.sha1(repr(pair).encode()).hexdigest()[:8]}"
        names[pair] = name
    return names


def observation(result: CallToolResult, label: str) -> Observation:
    """What the model reads of a tool result: text blocks joined, PNG images passed on as `Image` (with a note in
    the text), other content named. Structured content is shown as JSON when no text came with it (the spec asks
    servers to mirror it in a text block, so showing both would say it twice)."""
    texts, images = [], []
    for block in result.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "image" and block.mime_type == "image/png":
            try:
                images.append(Image(base64.b64decode(block.data, validate=True), alt=label))
                texts.append("[a PNG image, shown to the user]")
            except binascii.Error:
                texts.append("[a PNG image that is not valid base64, not shown]")
        elif block.type == "resource" and hasattr(block.resource, "text"):
            texts.append(block.resource.text)
        elif block.type == "resource_link":
            texts.append(f"[resource link: {block.name} {block.uri}]")
        else:
            texts.append(f"[{block.type} content ({getattr(block, 'mime_type', None) or 'binary'}), not shown]")
    if not texts and result.structured_content is not None:
        texts.append(json.dumps(result.structured_content, ensure_ascii=False))
    text = "\n".join(texts) or ("the tool failed without saying why" if result.is_error else "(no output)")
    return Observation(text, error=bool(result.is_error), images=images)


@dataclass
class _Server:
    """One configured server as the event loop thread sees it: its connection while live, else why not."""
    config: ServerConfig
    client: Client | None = None
    listed: list = field(default_factory=list)  # mcp_types.Tool, from the server's tools/list
    problem: str | None = None
    stderr: Path | None = None  # where a stdio server's stderr goes: why it failed is often there
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, error: BaseException, stderr_from: int = 0) -> None:
        """Mark the server unusable and say why, once (the caller's thread and the loop's may both notice): the
        innermost error of the SDK's exception groups, and what a stdio server wrote to stderr since `stderr_from`."""
        while getattr(error, "exceptions", None):
            error = error.exceptions[0]
        config = self.config
        if isinstance(error, OSError) and config.transport == "stdio" and error.strerror:
            problem = f"cannot run {config.command!r}: {error.strerror}"
        elif isinstance(error, MCPError) and error.code == CONNECTION_CLOSED:
            problem = "its process ended" if config.transport == "stdio" else f"lost the connection to {config.url}"
        else:
            problem = _describe(error)
        if self.stderr is not None and self.stderr.exists():
            with self.stderr.open("rb") as file:
                file.seek(max(stderr_from, self.stderr.stat().st_size - 4096))
                lines = [line.strip() for line in file.read().decode(errors="replace").splitlines() if line.strip()]
            if lines:
                problem += f"; its stderr ends with: {' | '.join(lines[-STDERR_TAIL_LINES:])[-300:]}"
        with self.lock:
            if self.problem is not None:
                return
            self.problem = problem
        log.warning("MCP server '%s' is unavailable: %s", config.name, problem)


class McpTools(Closeable):
    """The tools of every configured MCP server, callable from any thread. Starting waits (at most
    `start_timeout_s`) for all servers at once; each call waits at most `timeout_s`."""

    def __init__(self, servers: list[ServerConfig], *, timeout_s: float = 60.0, start_timeout_s: float = 30.0):
        self._timeout_s = timeout_s
        self._stderr_dir = tempfile.TemporaryDirectory(prefix="glmkit-mcp-", ignore_cleanup_errors=True)
        self._loop = asyncio.new_event_loop()
        self._servers = [_Server(config) for config in servers]
        self._thread = threading.Thread(target=self._loop.run_forever, name="glmkit-mcp", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start_all(start_timeout_s), self._loop).result()
        except BaseException:
            self.close()
            raise
        pairs = [(server, tool) for server in self._servers for tool in server.listed]
        names = tool_names([(server.config.name, tool.name) for server, tool in pairs])
        self._tools = [(server, Tool(
            name=names[server.config.name, tool.name], description=tool.description or tool.title or "",
            parameters=tool.input_schema or {"type": "object", "properties": {}},
            fn=partial(self._call, server, tool.name), timeout_s=timeout_s)) for server, tool in pairs]

    def tools(self) -> list[Tool]:
        """The tools of the servers that are up now."""
        return [tool for server, tool in self._tools if server.problem is None]

    def problems(self) -> dict[str, str]:
        """Server name -> why its tools are missing (it did not start, or it stopped)."""
        return {server.config.name: server.problem for server in self._servers if server.problem is not None}

    def close(self) -> None:
        """Disconnect from every server (stdio servers are stopped, the SDK escalating to a kill of their process
        group) and end the thread. Safe to call twice."""
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._stop_all(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        self._stderr_dir.cleanup()


    async def _start_all(self, timeout_s: float) -> None:
        await asyncio.gather(*(self._start(index, server, timeout_s) for index, server in enumerate(self._servers)))

    async def _start(self, index: int, server: _Server, timeout_s: float) -> None:
        if server.config.transport == "stdio":
            server.stderr = Path(self._stderr_dir.name) / f"{index}.log"
        ready = asyncio.get_running_loop().create_future()
        server.task = asyncio.create_task(self._run(server, ready))
        if not (await asyncio.wait([ready], timeout=timeout_s))[0]:
            server.fail(TimeoutError(f"it did not start within {timeout_s:g} s"))
            server.task.cancel()
            await asyncio.wait([server.task])

    async def _run(self, server: _Server, ready: asyncio.Future) -> None:
        """Hold the server's connection from start to `stop` (anyio wants it entered and left in one task)."""
        try:
            async with AsyncExitStack() as stack:
                client = Client(await self._transport(server.config, server.stderr, stack),
                                read_timeout_seconds=self._timeout_s,
                                client_info=Implementation(name="glmkit", version=__version__))
                await stack.enter_async_context(client)
                cursor = None
                while True:
                    page = await client.list_tools(cursor=cursor)
                    server.listed += page.tools
                    if not (cursor := page.next_cursor):
                        break
                server.client = client
                ready.set_result(None)
                await server.stop.wait()
        except Exception as error:
            server.fail(error)
        finally:
            server.client = None
            if not ready.done():
                ready.set_result(None)

    @staticmethod
    async def _transport(config: ServerConfig, stderr: Path | None, stack: AsyncExitStack):
        if config.transport == "stdio":
            # The server appends, fail() reads by path: the two never share a file offset.
            errlog = stack.enter_context(stderr.open("a", encoding="utf-8", errors="replace"))
            return stdio_client(StdioServerParameters(command=config.command, args=config.args, env=config.env),
                                errlog=errlog)
        if config.transport == "sse":
            return sse_client(config.url, headers=config.headers)
        http = await stack.enter_async_context(
            httpx2.AsyncClient(headers=config.headers, timeout=httpx2.Timeout(30.0, read=300.0)))
        return streamable_http_client(config.url, http_client=http)

    async def _stop_all(self) -> None:
        for server in self._servers:
            server.problem = server.problem or "the session was closed"
            server.stop.set()
            if server.client is None and server.task is not None:
                server.task.cancel()  # still starting: close() after an interrupted start
        await asyncio.gather(*(server.task for server in self._servers if server.task), return_exceptions=True)

    def _call(self, server: _Server, tool: str, /, **arguments) -> Observation:
        """Call `tool` on `server` from the caller's thread; every failure is an error observation."""
        name, client = server.config.name, server.client
        if client is None or server.problem is not None:
            return Observation(f"MCP server '{name}' is unavailable: {server.problem}. Its tool '{tool}' cannot "
                               "be called in this session.", error=True)
        stderr_from = server.stderr.stat().st_size if server.stderr and server.stderr.exists() else 0
        future = asyncio.run_coroutine_threadsafe(
            client.call_tool(tool, arguments, read_timeout_seconds=self._timeout_s), self._loop)
        timed_out = Observation(f"'{tool}' on MCP server '{name}' timed out after {self._timeout_s:g} s", error=True)
        try:
            result = future.result(self._timeout_s + 5)  # the SDK's own timeout (which cancels the call) comes first
        except concurrent.futures.TimeoutError:
            future.cancel()
            return timed_out
        except MCPError as error:
            if error.code == REQUEST_TIMEOUT:
                return timed_out
            if error.code != CONNECTION_CLOSED:
                return Observation(f"MCP server '{name}' refused the call to '{tool}': {error}", error=True)
            server.fail(error, stderr_from)
        except Exception as error:  # a broken transport (which ends the connection), a malformed result
            if not server.task.done():
                return Observation(f"calling '{tool}' on MCP server '{name}' failed: {_describe(error)}",
                                   error=True)
        else:
            return observation(result, f"{name}/{tool}")
        return Observation(f"MCP server '{name}' stopped: {server.problem}. Its tools are unavailable for the rest "
                           "of this session.", error=True)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
