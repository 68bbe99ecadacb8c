"""The tools a `glmkit chat` session offers, from its flags: `--tools builtin` (and/or tools files),
`--code-interpreter` (with `--sandbox`), `--mcp-config FILE`, `--allow-shell`, `--allow-network`. Returns the
Agent over the session's backend, and what must be closed when the session ends (the kernel, MCP servers).
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

from ..errors import InvalidParameterError

log = logging.getLogger("glmkit")


def add_arguments(p) -> None:
    g = p.add_argument_group("tools (the model may call them; each call and its result is shown)")
    g.add_argument("--tools", action="append", default=[], metavar="builtin|FILE.py",
                   help="'builtin' (calculator, current_time, random_number, read_file/list_files in the workspace) "
                   "or a Python file whose @tool functions are offered (repeatable)")
    g.add_argument("--code-interpreter", action="store_true",
                   help="the model may run Python in a private Jupyter kernel (plots are saved as PNG files)")
    g.add_argument("--sandbox", action="store_true",
                   help="run the kernel under bubblewrap: no network, read-only system, private /tmp")
    g.add_argument("--mcp-config", default=None, metavar="FILE.json",
                   help="tools from MCP servers, in the mcpServers format of Claude Desktop and LM Studio")
    g.add_argument("--workspace", default=None, metavar="DIR",
                   help="folder the file tools and the kernel work in (default: a new temporary folder)")
    g.add_argument("--allow-shell", action="store_true",
                   help="with --tools builtin, also a shell tool: the model may run ANY command as you")
    g.add_argument("--allow-network", action="store_true",
                   help="with --tools builtin, also get_weather and fetch_url (they need the network)")
    g.add_argument("--max-rounds", default=5, type=int, help="rounds of tool calls per answer (default 5)")


def wants_tools(args) -> bool:
    return bool(args.tools or args.code_interpreter or args.mcp_config)


def check_flags(args) -> None:
    """Refuse tool flags that cannot work, before a model loads: one line naming the flag."""
    needs = [("--tools", args.tools, "jsonschema"), ("--code-interpreter", args.code_interpreter, "jupyter_client"),
             ("--code-interpreter", args.code_interpreter, "ipykernel"), ("--mcp-config", args.mcp_config, "mcp")]
    for flag, used, module in needs:
        if used and importlib.util.find_spec(module) is None:
            raise InvalidParameterError(flag, used, f"needs the tools extra ({module} is missing): "
                                        "pip install 'glmkit[tools]'")
    if args.sandbox and not args.code_interpreter:
        raise InvalidParameterError("--sandbox", True, "applies to the code interpreter; add --code-interpreter")
    if (args.allow_shell or args.allow_network) and "builtin" not in args.tools:
        raise InvalidParameterError("--allow-shell" if args.allow_shell else "--allow-network", True,
                                    "adds built-in tools; add --tools builtin")
    for source in args.tools:
        if source != "builtin" and not Path(source).expanduser().is_file():
            raise InvalidParameterError("--tools", source, "is neither 'builtin' nor a Python file of @tool functions")
    if args.mcp_config and not Path(args.mcp_config).expanduser().is_file():
        raise InvalidParameterError("--mcp-config", args.mcp_config, "does not exist; pass an mcpServers JSON file")
    if args.workspace and not Path(args.workspace).expanduser().is_dir():
        raise InvalidParameterError("--workspace", args.workspace, "is not a folder")
    if args.max_rounds < 1:
        raise InvalidParameterError("--max-rounds", args.max_rounds, "must be at least 1")


def build_agent(args, backend, settings: dict, extra: list | None = None):
    """(Agent, [things to close]) for the flags (checked by check_flags); `extra`: more tools (a knowledge
    base's search)."""
    from .agent import Agent
    from .builtins import builtin_tools
    from .registry import load_tools_file

    workspace = Path(args.workspace).expanduser() if args.workspace else Path(tempfile.mkdtemp(prefix="glmkit-"))
    tools, closing = list(extra or []), []
    for source in args.tools:
        if source == "builtin":
            tools += builtin_tools(workspace, allow_shell=args.allow_shell, allow_network=args.allow_network)
        else:
            tools += load_tools_file(source)
    if args.mcp_config:
        tools += mcp_tools(args.mcp_config, closing)
    kernel = None
    if args.code_interpreter:
        from .kernel import KernelSession

        kernel = KernelSession(workspace, sandbox=args.sandbox)
        closing.append(kernel)
    agent = Agent(backend, tools, code_interpreter=kernel or False, max_rounds=args.max_rounds, settings=settings)
    return agent, closing


def mcp_tools(config_path, closing: list) -> list:
    """The tools of the MCP servers in an mcpServers file (those that fail to start are logged and left out);
    the client goes into `closing`."""
    from .mcp_client import McpTools, load_config

    mcp = McpTools(load_config(config_path))
    closing.append(mcp)
    for name, problem in mcp.problems().items():
        log.warning("glmkit: MCP server %r is unavailable: %s", name, problem)
    return mcp.tools()
