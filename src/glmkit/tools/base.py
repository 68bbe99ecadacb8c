"""The contract every tool source meets (the @tool registry, the built-ins, the code interpreter, MCP servers)
and the agent loop relies on: a `Tool` is a name, a description, a JSON schema of its arguments and a callable;
calling it gives an `Observation`, the text (and images) the model reads back. Nothing here runs model output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Image:
    """A picture a tool made (the code interpreter's plots): PNG bytes."""
    png: bytes
    alt: str = ""


@dataclass
class Observation:
    """What a tool call gives back. `text` is what the model reads (kept short: callers cap it); `error` marks a
    failed call (bad arguments, an exception, a timeout, a dead kernel), whose text says what went wrong in
    words the model can act on; `images` travel beside the text to the user, not to the model."""
    text: str
    error: bool = False
    images: list[Image] = field(default_factory=list)


@dataclass
class Tool:
    """One callable tool. `parameters` is the JSON schema of the arguments object (OpenAI's `parameters`);
    `fn(**arguments)` returns a str, an Observation, or any JSON-able value (shown as JSON). `timeout_s` bounds
    one call."""
    name: str
    description: str
    parameters: dict
    fn: Callable[..., Any]
    timeout_s: float = 30.0

    def spec(self) -> dict:
        """The OpenAI tool definition ({"type": "function", "function": {...}})."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


class Closeable:
    """`with X(...) as x:` closes x at the end; subclasses define `close` (safe to call twice)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
