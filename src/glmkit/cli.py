"""`glmkit <command>`: a fixed table of subcommands, each a module with add_arguments(parser) and main(args).

Knows only the table; the shared flags live in commands/args.py, so no command imports this module back."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "chat": ("glmkit.ui.terminal", "chat in the terminal with a local model (default: the embedded model)"),
    "generate": ("glmkit.commands.generate", "complete one prompt and print it"),
    "serve": ("glmkit.commands.serve", "serve the OpenAI-compatible and ChatGLM APIs over HTTP"),
    "info": ("glmkit.commands.info", "show the resolved model, chat format and limits"),
    "quantize": ("glmkit.commands.quantize", "save an int8/int4 copy of a model that loads without quantizing again"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmkit", description="Deploy ChatGLM-family and other chat models privately.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    from .errors import GlmkitError

    try:
        return modules[args.command].main(args) or 0
    except GlmkitError as e:
        print(f"glmkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
