"""Real MCP servers for tests/test_mcp.py, built with the `mcp` SDK's MCPServer (FastMCP before mcp 2).

`python tests/mcp_servers.py NAME` serves the tools over stdio (what `glmkit chat --mcp-config` starts as a
subprocess); `serve_http(name)` serves them over streamable HTTP on 127.0.0.1 from a thread of the test process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import threading
import zlib
from contextlib import contextmanager

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from mcp_types import CallToolResult


def tiny_png() -> bytes:
    """A valid 1x1 red PNG, made without Pillow."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8 bits, RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
            + chunk(b"IEND", b""))


def build(name: str) -> MCPServer:
    """The test tools: arithmetic with a schema, a failure, an image, structured output, the server's pid and env."""
    server = MCPServer(name, log_level="WARNING")

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def fail(message: str) -> str:
        """Always raises, with the given message."""
        raise ToolError(message)

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Wait, then say so."""
        await asyncio.sleep(seconds)
        return "awake"

    @server.tool()
    def table() -> CallToolResult:
        """Structured content only, no text."""
        return CallToolResult(content=[], structured_content={"rows": [[1, "a"], [2, "b"]]})

    @server.tool()
    def red_dot() -> Image:
        """A 1x1 red PNG."""
        return Image(data=tiny_png(), format="png")

    @server.tool()
    def whoami() -> dict:
        """The server's pid and its GREETING environment variable (structured output)."""
        return {"pid": os.getpid(), "greeting": os.environ.get("GREETING", "")}

    @server.tool(name="weird name!")
    def weird() -> str:
        """A tool whose name OpenAI would refuse."""
        return "ok"

    return server


@contextmanager
def serve_http(name: str, transport: str = "streamable-http"):
    """Serve `build(name)` over streamable HTTP (or the older SSE transport) on a free 127.0.0.1 port, from a
    thread; yields the endpoint URL and the headers of every request seen, and stops the server on exit. The socket
    is bound here, so nothing else can take the port between choosing and using it."""
    import uvicorn

    server = build(name)
    app = server.sse_app() if transport == "sse" else server.streamable_http_app()
    seen: list[dict[str, str]] = []

    async def recording_app(scope, receive, send):
        if scope["type"] == "http":
            seen.append({key.decode(): value.decode() for key, value in scope["headers"]})
        await app(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    http = uvicorn.Server(uvicorn.Config(recording_app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not http.started:
        if not thread.is_alive():
            raise RuntimeError("the test MCP HTTP server did not start")
        threading.Event().wait(0.02)
    try:
        path = "/sse" if transport == "sse" else "/mcp"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}{path}", seen
    finally:
        http.should_exit = True
        thread.join(10)
        sock.close()


if __name__ == "__main__":
    build(sys.argv[1]).run("stdio")
