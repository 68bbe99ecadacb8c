"""The web page's command-line flags, shared by `glmkit serve` (the page at /ui) and `glmkit web` (the page
alone), and the WebConfig they make: the Tools mode's tools, the Code Interpreter's kernel pool, the store.
Imports Gradio only when a page is built, so `glmkit serve` without the web extra still serves the API."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ...errors import InvalidParameterError

log = logging.getLogger("glmkit")


def add_arguments(p, *, serve: bool) -> None:
    g = p.add_argument_group("web page" + (" (at /ui)" if serve else ""))
    if serve:
        g.add_argument("--no-ui", dest="ui", action="store_false", help="serve the API only, no web page at /ui")
    g.add_argument("--language", choices=["en", "zh"], default=None,
                   help="the page's labels (default: the browser's language)")
    g.add_argument("--conversations", default=None, metavar="FILE",
                   help="SQLite file the page keeps conversations in (default: $GLMKIT_HOME/web.sqlite3, else "
                   "~/.local/share/glmkit/web.sqlite3)")
    g.add_argument("--tools", action="append", default=[], metavar="FILE.py",
                   help="a Python file of @tool functions for the Tools mode, beside the built-in calculator, "
                   "current_time and random_number (repeatable)")
    g.add_argument("--mcp-config", default=None, metavar="FILE.json",
                   help="tools from MCP servers for the Tools mode (mcpServers format)")
    g.add_argument("--sandbox", action="store_true",
                   help="run the Code Interpreter's kernels under bubblewrap (no network, read-only system)")
    g.add_argument("--max-kernels", default=8, type=int,
                   help="Python kernels alive at once, one per conversation (default 8; idle ones close after 15 min)")
    g.add_argument("--max-rounds", default=5, type=int, help="rounds of tool calls per answer (default 5)")


def available() -> bool:
    return importlib.util.find_spec("gradio") is not None


def check(args) -> None:
    for source in args.tools:
        if not Path(source).expanduser().is_file():
            raise InvalidParameterError("--tools", source, "is not a Python file of @tool functions")
    if args.mcp_config and not Path(args.mcp_config).expanduser().is_file():
        raise InvalidParameterError("--mcp-config", args.mcp_config, "does not exist; pass an mcpServers JSON file")
    if args.max_kernels < 0:
        raise InvalidParameterError("--max-kernels", args.max_kernels, "must be 0 (no Code Interpreter) or more")
    if args.max_rounds < 1:
        raise InvalidParameterError("--max-rounds", args.max_rounds, "must be at least 1")


def web_config(args, url: str, *, api_key: str | None = None, check_key=None, glmkit_server: bool = True):
    """(WebConfig, [things to close when the page stops])."""
    from .app import WebConfig
    from .store import ConversationStore, default_path

    closing = []
    store = ConversationStore(args.conversations or default_path())
    closing.append(store)
    tools = _tools(args, closing)
    kernels = None
    if args.max_kernels and all(importlib.util.find_spec(m) for m in ("jupyter_client", "ipykernel")):
        from ...tools.kernel import KernelPool

        kernels = KernelPool(max_kernels=args.max_kernels, sandbox=args.sandbox)
        closing.append(kernels)
    elif args.max_kernels:
        log.warning("glmkit: the Code Interpreter mode needs the tools extra (pip install 'glmkit[tools]'); "
                    "it answers without a kernel")
    config = WebConfig(url=url, store=store, api_key=api_key, check_key=check_key, tools=tools, kernels=kernels,
                       max_rounds=args.max_rounds, language=args.language, glmkit_server=glmkit_server)
    return config, closing


def _tools(args, closing: list) -> list:
    if importlib.util.find_spec("jsonschema") is None:
        log.warning("glmkit: the Tools mode needs the tools extra (pip install 'glmkit[tools]'); it offers none")
        return []
    from ...tools.builtins import calculator, current_time, random_number
    from ...tools.registry import load_tools_file

    # No file or shell tools: the page's users share this process, and one user's files are not another's.
    tools = [calculator.tool, current_time.tool, random_number.tool]
    for source in args.tools:
        tools += load_tools_file(source)
    if args.mcp_config:
        from ...tools.setup import mcp_tools

        tools += mcp_tools(args.mcp_config, closing)
    return tools
