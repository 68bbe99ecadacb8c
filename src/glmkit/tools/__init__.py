"""Tools the model can call, and the loop that runs them: the contract (base.py), @tool and calling a tool
safely (registry.py, signatures.py), the built-ins (builtins.py, calculator.py), the code interpreter
(kernel.py, sandbox.py), MCP servers (mcp_client.py), the agent loop (agent.py), and `glmkit chat`'s tool flags
(setup.py). The names below load on first use: a chat without tools needs none of the `tools` extra."""

from importlib import import_module

_HOMES = {"Image": "base", "Observation": "base", "Tool": "base", "Toolbox": "registry", "call_tool": "registry",
          "tool": "registry", "Agent": "agent"}


def __getattr__(name):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_HOMES)
