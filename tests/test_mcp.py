"""glmkit.tools.mcp_client against real MCP servers (tests/mcp_servers.py): one run over stdio as a subprocess,
one served over streamable HTTP and one over SSE from threads of this process, plus servers that cannot start."""

import base64
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import mcp_servers
import pytest
from mcp_types import (AudioContent, BlobResourceContents, CallToolResult, EmbeddedResource, ImageContent,
                       ResourceLink, TextContent, TextResourceContents)

from glmkit.tools.mcp_client import McpConfigError, McpTools, load_config, observation, parse_config, tool_names

SERVER_SCRIPT = str(Path(mcp_servers.__file__))
OPENAI_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def stdio(name: str, **extra) -> dict:
    return {"command": sys.executable, "args": [SERVER_SCRIPT, name], **extra}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Every kind of server at once, from a config file: three that work, three that cannot start."""
    refusing = socket.socket()  # bound, never listening: connections to it are refused
    refusing.bind(("127.0.0.1", 0))
    with mcp_servers.serve_http("remote") as (url, seen), mcp_servers.serve_http("legacy", "sse") as (sse_url, _), \
            refusing:
        config = {"mcpServers": {
            "local": stdio("local", env={"GREETING": "hello"}),
            "remote": {"type": "streamableHttp", "url": url, "headers": {"Authorization": "Bearer t0ken"}},
            "legacy": {"type": "sse", "url": sse_url},
            "missing": {"command": "/nonexistent/mcp-server"},
            "crashing": {"command": sys.executable, "args": ["-c", "import sys; sys.exit('cannot open the database')"]},
            "offline": {"url": f"http://127.0.0.1:{refusing.getsockname()[1]}/mcp"},
            "off": {"command": "/nonexistent/other", "disabled": True},
        }}
        path = tmp_path_factory.mktemp("mcp") / "mcp.json"
        path.write_text(json.dumps(config))
        with McpTools(load_config(path), timeout_s=20) as tools:
            yield tools, seen


def by_name(mcp_tools: McpTools) -> dict:
    return {tool.name: tool for tool in mcp_tools.tools()}


def test_tools_are_listed_with_their_schemas(servers):
    tools = by_name(servers[0])
    assert {name.split("__")[0] for name in tools} == {"local", "remote", "legacy"}
    assert all(OPENAI_NAME.match(name) for name in tools)
    add = tools["local__add"]
    assert add.description == "Add two integers."
    assert add.parameters["properties"].keys() == {"a", "b"} and add.parameters["required"] == ["a", "b"]
    assert add.spec()["function"]["parameters"]["properties"]["a"]["type"] == "integer"
    assert "remote__weird_name_" in tools  # "weird name!" made valid


@pytest.mark.parametrize("server", ["local", "remote", "legacy"])
def test_calls_with_arguments_over_each_transport(servers, server):
    tools = by_name(servers[0])
    result = tools[f"{server}__add"].fn(a=2, b=40)
    assert (result.text, result.error) == ("42", False)
    assert not tools[f"{server}__weird_name_"].fn().error


def test_stdio_env_and_http_headers_reach_the_server(servers):
    tools, seen = servers
    assert json.loads(by_name(tools)["local__whoami"].fn().text)["greeting"] == "hello"
    assert seen and all(headers.get("authorization") == "Bearer t0ken" for headers in seen)


def test_a_tool_that_raises_gives_an_error_observation(servers):
    tools = by_name(servers[0])
    result = tools["local__fail"].fn(message="no such city")
    assert result.error and "no such city" in result.text
    bad_arguments = tools["remote__add"].fn(a="two", b=1)  # the server checks the arguments against its schema
    assert bad_arguments.error and "valid integer" in bad_arguments.text


def test_images_and_structured_content(servers):
    tools = by_name(servers[0])
    picture = tools["remote__red_dot"].fn()
    assert not picture.error and [image.png for image in picture.images] == [mcp_servers.tiny_png()]
    assert "image" in picture.text
    table = tools["local__table"].fn()
    assert json.loads(table.text) == {"rows": [[1, "a"], [2, "b"]]}


def test_servers_that_cannot_start_are_reported_and_absent(servers):
    tools, _ = servers
    problems = tools.problems()
    assert problems.keys() == {"missing", "crashing", "offline"}  # and "off" is disabled, not started
    assert "cannot run '/nonexistent/mcp-server'" in problems["missing"]
    assert "cannot open the database" in problems["crashing"]  # the end of its stderr
    assert "ConnectError" in problems["offline"]
    assert not [name for name in by_name(tools) if name.split("__")[0] in problems]


def test_a_failed_start_is_a_warning_naming_the_server(caplog):
    with caplog.at_level(logging.WARNING, logger="glmkit"):
        with McpTools(parse_config({"mcpServers": {"gone": {"command": "/nonexistent/x"}}})) as tools:
            assert tools.tools() == []
    assert "MCP server 'gone' is unavailable: cannot run '/nonexistent/x'" in caplog.text


def test_a_server_that_never_answers_times_out_at_start():
    silent = {"command": sys.executable, "args": ["-c", "import sys; sys.stdin.read()"]}
    started = time.monotonic()
    with McpTools(parse_config({"mcpServers": {"silent": silent}}), start_timeout_s=1) as tools:
        assert "did not start within 1 s" in tools.problems()["silent"]
    assert time.monotonic() - started < 10


def test_a_killed_stdio_server_gives_clear_errors_and_close_stops_the_rest():
    config = parse_config({"mcpServers": {"victim": stdio("victim"), "survivor": stdio("survivor")}})
    with McpTools(config, timeout_s=2) as tools:
        calls = by_name(tools)
        slow = calls["victim__sleep"].fn(seconds=30)
        assert slow.error and "timed out after 2 s" in slow.text
        assert calls["victim__add"].fn(a=1, b=1).text == "2"  # a timeout leaves the server usable
        victim = json.loads(calls["victim__whoami"].fn().text)["pid"]
        survivor = json.loads(calls["survivor__whoami"].fn().text)["pid"]
        os.kill(victim, signal.SIGKILL)
        dead = calls["victim__add"].fn(a=1, b=1)
        assert dead.error and "MCP server 'victim' stopped: its process ended" in dead.text
        again = calls["victim__add"].fn(a=1, b=1)
        assert again.error and "'victim' is unavailable" in again.text
        assert {name.split("__")[0] for name in by_name(tools)} == {"survivor"}
        assert tools.problems() == {"victim": "its process ended"}
        assert calls["survivor__add"].fn(a=1, b=2).text == "3"
    assert not alive(survivor)
    assert calls["survivor__add"].fn(a=1, b=2).error  # after close: an error, not a hang


def test_a_stopped_http_server_gives_a_clear_error():
    with mcp_servers.serve_http("brief") as (url, _):
        tools = McpTools(parse_config({"mcpServers": {"brief": {"url": url}}}))
    with tools:
        result = by_name(tools)["brief__add"].fn(a=1, b=1)
        # Which error the transport sees first is a race: the closed stream, or the refused reconnection
        assert result.error and "MCP server 'brief' stopped: " in result.text
        assert f"lost the connection to {url}" in result.text or "ConnectError" in result.text, result.text
        assert tools.tools() == []


@pytest.mark.parametrize("config, message", [
    ([], 'expected an object {"mcpServers"'),
    ({"servers": {}}, 'expected an object {"mcpServers"'),
    ({"mcpServers": {"a": "npx server"}}, 'mcpServers.a: expected an object with a "command" or a "url"'),
    ({"mcpServers": {"a": {}}}, 'mcpServers.a: needs either "command"'),
    ({"mcpServers": {"a": {"command": "x", "url": "http://h"}}}, 'mcpServers.a: needs either "command"'),
    ({"mcpServers": {"a": {"command": ""}}}, "mcpServers.a.command: expected a non-empty string, got ''"),
    ({"mcpServers": {"a": {"command": "x", "args": "--port 1"}}}, "mcpServers.a.args: expected a list of strings"),
    ({"mcpServers": {"a": {"command": "x", "env": {"N": 1}}}}, "mcpServers.a.env: expected an object of strings"),
    ({"mcpServers": {"a": {"url": "localhost:8000"}}}, "mcpServers.a.url: expected an http:// or https:// URL"),
    ({"mcpServers": {"a": {"url": "http://h", "headers": ["x"]}}}, "mcpServers.a.headers: expected an object"),
    ({"mcpServers": {"a": {"type": "websocket", "url": "ws://h"}}}, "mcpServers.a.type: expected one of stdio, http"),
    ({"mcpServers": {"a": {"transport": ["sse"], "url": "http://h"}}}, "mcpServers.a.transport: expected one of"),
    ({"mcpServers": {"a": {"type": "stdio", "url": "http://h"}}}, 'a server of type stdio takes "command", not "url"'),
    ({"mcpServers": {"a": {"transport": "http", "command": "x"}}}, 'a server of type http takes "url", not "command"'),
    ({"mcpServers": {" ": {"command": "x"}}}, "mcpServers has a server with an empty name"),
])
def test_config_errors_name_the_file_server_and_field(config, message):
    with pytest.raises(McpConfigError) as caught:
        parse_config(config, "mcp.json")
    assert str(caught.value).startswith("mcp.json: ") and message in str(caught.value)


def test_config_file_errors_and_transport_hints(tmp_path):
    with pytest.raises(McpConfigError, match="cannot read the MCP config"):
        load_config(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text('{"mcpServers": {')
    with pytest.raises(McpConfigError, match=r"broken.json: not valid JSON"):
        load_config(tmp_path / "broken.json")
    servers = parse_config({"mcpServers": {"a": {"type": "streamable-http", "url": "https://h/mcp"},
                                           "b": {"transport": "sse", "url": "http://h/sse", "autoApprove": []},
                                           "c": {"command": "uvx", "args": ["srv"], "type": "stdio"}}})
    assert [(server.name, server.transport) for server in servers] == [("a", "http"), ("b", "sse"), ("c", "stdio")]


def test_tool_names_are_valid_unique_and_deterministic():
    pairs = [("files", "read"), ("my server", "read file"), ("my_server", "read_file"), ("s", "x" * 80)]
    names = tool_names(pairs)
    assert names[("files", "read")] == "files__read"
    assert len(set(names.values())) == len(pairs) and all(OPENAI_NAME.match(name) for name in names.values())
    assert names[("my server", "read file")].startswith("my_server__read_file_")  # clash: a hash suffix each
    assert names == tool_names(list(reversed(pairs)))


def test_observation_of_other_content():
    result = CallToolResult(content=[
        TextContent(type="text", text="first"),
        EmbeddedResource(type="resource", resource=TextResourceContents(uri="file:///a.txt", text="file text")),
        EmbeddedResource(type="resource", resource=BlobResourceContents(uri="file:///b.bin", blob="AAAA")),
        ResourceLink(type="resource_link", name="report", uri="file:///r.pdf"),
        AudioContent(type="audio", data="AAAA", mime_type="audio/wav"),
        ImageContent(type="image", data="not base64!", mime_type="image/png"),
        ImageContent(type="image", data=base64.b64encode(b"jpeg").decode(), mime_type="image/jpeg"),
    ], structured_content={"ignored": "the text says it"})
    text = observation(result, "s/t").text.splitlines()
    assert text[:4] == ["first", "file text", "[resource content (binary), not shown]",
                        "[resource link: report file:///r.pdf]"]
    assert text[4:] == ["[audio content (audio/wav), not shown]", "[a PNG image that is not valid base64, not shown]",
                        "[image content (image/jpeg), not shown]"]
    failed = observation(CallToolResult(content=[], is_error=True), "s/t")
    assert failed.error and failed.text == "the tool failed without saying why"
