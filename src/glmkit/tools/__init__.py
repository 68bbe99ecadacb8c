"""Tools the model can call, and the loop that runs them: the contract (base.py), @tool and calling a tool
safely (registry.py, signatures.py), the built-ins (builtins.py, calculator.py), the code interpreter
(kernel.py, sandbox.py), MCP servers (mcp_client.py), the agent loop (agent.py), and `glmkit chat`'s tool flags
(setup.py). Importing this package loads none of the heavy parts (Jupyter, MCP)."""

from .base import Image, Observation, Tool
from .registry import Toolbox, call_tool, tool


def __getattr__(name):
    if name == "Agent":  # the agent pulls in the chat backends
        from .agent import Agent

        return Agent
    raise AttributeError(name)


__all__ = ["Agent", "Image", "Observation", "Tool", "Toolbox", "call_tool", "tool"]
