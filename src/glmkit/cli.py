"""`glmkit <command>`: a fixed table of subcommands, each a module with add_arguments(parser) and main(args).

Also the one place where failures become what a user reads: a mistake on the command line or a GlmkitError is
one line `glmkit: error: ...` and exit code 2 (with a suggestion for a misspelled flag or command), Ctrl-C that no
command handled itself is `glmkit: interrupted` and 130, and anything unexpected is one line (the traceback only
with -v) and 1. Knows only the table; the shared flags live in commands/args.py, so no command imports this
module back. Command modules must not import torch at import time: `glmkit --help` and a bad flag stay instant.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys

COMMANDS = {
    "chat": ("glmkit.ui.terminal", "chat in the terminal with a local model (default: the embedded one) or a "
             "server (--url)"),
    "generate": ("glmkit.commands.generate", "complete one prompt and stream it to standard output"),
    "serve": ("glmkit.commands.serve", "serve the OpenAI-compatible and ChatGLM APIs over HTTP, and the web page"),
    "web": ("glmkit.commands.web", "the web chat page alone, for any OpenAI-compatible server (--url)"),
    "info": ("glmkit.commands.info", "show the resolved model, chat format and limits"),
    "quantize": ("glmkit.commands.quantize", "save an int8/int4 copy of a model that loads without quantizing again"),
    "cache": ("glmkit.commands.cache", "list or clean glmkit's cache of converted and quantized models"),
    "finetune": ("glmkit.commands.finetune", "fine-tune a model (LoRA, P-Tuning v2) on your own conversations"),
    "eval": ("glmkit.commands.evaluate", "score a model (and adapter) on a dev set: ROUGE-1/2/L and BLEU-4"),
    "merge": ("glmkit.commands.merge", "fold a LoRA adapter into the model's weights and save the result"),
    "kb": ("glmkit.commands.kb", "knowledge bases from your own files: create, add, remove, list, delete, search"),
}
EXIT_USAGE, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 2, 1, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for any tool whose reader went away (`| head`)


class UsageError(Exception):
    """A command-line mistake found by argparse (raised instead of argparse's usage-and-exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version as installed_version

        return installed_version("glmkit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return __version__


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(prog="glmkit", description="Deploy ChatGLM-family and other chat models privately.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more; show tracebacks")
    parser.add_argument("--version", action="version", version=f"glmkit {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers = {}
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # -v after the command too (`glmkit serve ... -v`); SUPPRESS keeps the sub-parser from resetting it.
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more")
        importlib.import_module(module_name).add_arguments(p)
        subparsers[name] = p
    return parser, subparsers


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def explain(message: str) -> str:
    """argparse's wording -> ours: the flag as typed first, the choices spelled out, a suggestion if close."""
    choice = re.fullmatch(r"argument (\S+): invalid choice: '(.*?)' \(choose from (.*)\)", message)
    if choice:
        name, value, choices = choice[1].split("/")[-1], choice[2], re.findall(r"'([^']*)'", choice[3])
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        if name == "COMMAND":
            return f"unknown command '{value}'; " + (f"did you mean '{close[0]}'?" if close else
                                                     f"commands: {', '.join(COMMANDS)}")
        return f"{name}={value!r}: must be one of {', '.join(choices)}" + (f"; did you mean {close[0]}?" if close
                                                                          else "")
    flag = re.fullmatch(r"argument (\S+): (.*)", message)
    if flag:
        name, rest = flag[1].split("/")[-1], flag[2]
        if rest.startswith(name + "="):  # our own checks (commands/args.py) already name the flag
            return rest
        if rest == "expected one argument":
            return f"{name} needs a value"
        return f"{name}: {rest}"
    required = re.fullmatch(r"the following arguments are required: (.*)", message)
    if required and required[1] == "COMMAND":
        return f"missing command; choose one of {', '.join(COMMANDS)} (glmkit --help explains them)"
    if required:
        return f"missing {required[1]}: {'they are' if ',' in required[1] else 'it is'} required"
    return message


def unrecognized(extras: list[str], command: str | None, subparsers: dict) -> str:
    """One line about the first unknown flag (with the closest known flag), else the first stray word."""
    flags = [token for token in extras if token.startswith("-") and len(token) > 1]
    if not flags:
        return f"unexpected argument {extras[0]!r}" + (f"; see glmkit {command} --help" if command else "")
    known = subparsers[command]._option_string_actions if command else {}  # argparse has no public list
    name = flags[0].split("=", 1)[0]
    return f"unrecognized argument {name}" + _suggest(name, [k for k in known if k.startswith("--")])


def parse(argv: list[str]) -> argparse.Namespace:
    parser, subparsers = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        raise UsageError(unrecognized(extras, args.command, subparsers))
    if args.command is None:
        raise UsageError(explain("the following arguments are required: COMMAND"))
    return args


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(args) or 0


def _end_progress_bars() -> bool:
    """Close the progress bars an exception cut short (they end their line where they stopped), so the message
    that follows starts a line of its own. True if there were any."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
    for bar in bars:
        bar.close()
    return bool(bars)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    if hasattr(sys.stdout, "reconfigure"):  # a non-UTF-8 locale: show '?' for what it cannot encode, never crash
        sys.stdout.reconfigure(errors="replace")
    from .errors import GlmkitError

    try:
        args = parse(argv)
        return run(args)
    except UsageError as e:
        print(f"glmkit: error: {explain(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except GlmkitError as e:
        _end_progress_bars()
        print(f"glmkit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # On a terminal the cursor may sit after the echoed ^C: start a fresh line (a closed bar already did).
        fresh_line = _end_progress_bars() or not sys.stderr.isatty()
        print(("" if fresh_line else "\n") + "glmkit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (`glmkit generate ... | head -1`): silence the final flush's second error too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - the last resort: one line, the traceback only when asked for
        if args is not None and args.verbose:
            raise
        _end_progress_bars()
        print(f"glmkit: error: {type(e).__name__}: {_one_line(e)} (run with -v for the traceback)", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
