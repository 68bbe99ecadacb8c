"""Slash commands of the interactive chat: /help, /bye, /clear, /system, /set, /show, /save, /load, /stats.

A line is a command when its first word is `/` and letters (so `/usr/bin/env is what?` is a message). Commands
exist only when typed at the prompt: piped input never reaches this module. Every mistake is one line that names
the command, the value and the fix; an unknown command gets the closest name and is never sent to the model.

Knows the ChatSession's state (conversation, settings, stats switch, backend name and context) and the Console;
not prompt_toolkit, nor how answers are made.
"""

from __future__ import annotations

import re
from difflib import get_close_matches
from pathlib import Path

from .conversation import SETTING_TYPES, ChatInputError, Conversation, parse_setting

QUIT = "quit"
COMMAND_LINE = re.compile(r"/([A-Za-z_]+)(?:\s+(.*))?\Z", re.S)
HELP = [
    ("/help", "this list"),
    ("/bye", "quit (also /exit, /quit, or Ctrl-D)"),
    ("/clear", "forget the conversation (the system prompt stays)"),
    ("/system TEXT", "set the system prompt and start the conversation over (no TEXT: show it)"),
    ("/set NAME VALUE", "change a setting: " + ", ".join(SETTING_TYPES)),
    ("/show", "the model and the current settings"),
    ("/save FILE", "write the conversation to FILE as JSON"),
    ("/load FILE", "restore a conversation written by /save"),
    ("/stats", "turn the time-and-speed line after each answer on or off"),
]
KEYS = ('Alt-Enter (or Esc, Enter) adds a line; a paste is one message; """ starts a block that ends at """. '
        "Ctrl-C stops an answer; Ctrl-D quits.")


def parse_command(text: str) -> tuple[str, str] | None:
    """(name, argument text) if the line is a slash command, else None (it is a message)."""
    match = COMMAND_LINE.match(text.strip())
    if match is None:
        return None
    return match.group(1).lower(), (match.group(2) or "").strip()


class Commands:
    def __init__(self, session, console, location: str):
        self.session, self.console = session, console
        self.location = location  # where the model runs, for /show: "local, 512-token context" or a URL
        self.table = {"help": self.help, "bye": self.bye, "exit": self.bye, "quit": self.bye,
                      "clear": self.clear, "system": self.system, "set": self.set, "show": self.show,
                      "save": self.save, "load": self.load, "stats": self.stats}

    @property
    def names(self) -> list[str]:
        return list(self.table)

    def run(self, name: str, arg: str) -> str | None:
        """Run one command; QUIT when the session should end."""
        handler = self.table.get(name)
        if handler is None:
            close = get_close_matches(name, self.table, n=1, cutoff=0.5)
            hint = f"did you mean /{close[0]}? " if close else ""
            self.console.warn(f"unknown command /{name}; {hint}/help lists the commands")
            return None
        try:
            return handler(arg)
        except ChatInputError as e:
            self.console.warn(str(e))
            return None

    # -- the commands ----------------------------------------------------------------------------------
    def help(self, arg: str) -> None:
        width = max(len(usage) for usage, _ in HELP)
        for usage, text in HELP:
            self.console.notice(f"  {usage.ljust(width)}  {text}")
        self.console.notice(KEYS)

    def bye(self, arg: str) -> str:
        return QUIT

    def clear(self, arg: str) -> None:
        self.session.conversation.reset()
        self.console.notice("(conversation cleared)")

    def system(self, arg: str) -> None:
        conversation = self.session.conversation
        if not arg:
            shown = conversation.system if conversation.system else "(none)"
            self.console.notice(f"system prompt: {shown}")
            return
        conversation.system = arg
        conversation.reset()
        self.console.notice("(system prompt set; the conversation starts over)")

    def set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if name.lower() == "system":  # Ollama's spelling of /system
            return self.system(value.strip())
        if not name:
            raise ChatInputError(f"/set needs a setting and a value, e.g. /set temperature 0.7; settings: "
                                 f"{', '.join(SETTING_TYPES)}")
        if not value.strip():
            raise ChatInputError(f"/set {name}: needs a value, e.g. /set {name} "
                                 f"{'0.7' if SETTING_TYPES.get(name, float) is float else '42'}")
        key, parsed = parse_setting(name, value.strip(), self.session.settings)
        self.session.settings[key] = parsed
        self.console.notice(f"({key}={_shown(parsed)})")

    def show(self, arg: str) -> None:
        session = self.session
        system = session.conversation.system
        self.console.notice(f"model: {session.backend.name} ({self.location})")
        self.console.notice(f"system prompt: {_one_line(system) if system else '(none)'}")
        self.console.notice("settings: " + settings_text(session.settings))
        self.console.notice(f"turns: {session.conversation.num_turns}; stats: {'on' if session.show_stats else 'off'}")

    def save(self, arg: str) -> None:
        path = self._path("save", arg)
        conversation = self.session.conversation
        try:
            conversation.save(path, self.session.settings)
        except OSError as e:
            raise ChatInputError(f"/save {arg}: cannot write it ({e.strerror or e})") from None
        self.console.notice(f"(saved {_count(conversation.num_turns, 'turn')} to {path})")

    def load(self, arg: str) -> None:
        path = self._path("load", arg)
        session = self.session
        conversation, settings = Conversation.load(path, session.settings)
        conversation.greeting = session.conversation.greeting  # /clear still starts with the greeting
        session.conversation, session.settings = conversation, settings
        system = "a system prompt" if conversation.system else "no system prompt"
        self.console.notice(f"(loaded {path}: {_count(conversation.num_turns, 'turn')}, {system}; "
                            f"{settings_text(settings)})")

    def stats(self, arg: str) -> None:
        self.session.show_stats = not self.session.show_stats
        self.console.notice(f"(stats {'on' if self.session.show_stats else 'off'})")

    @staticmethod
    def _path(command: str, arg: str) -> Path:
        if not arg:
            raise ChatInputError(f"/{command} needs a file name, e.g. /{command} chat.json")
        return Path(arg).expanduser()


def settings_text(settings: dict) -> str:
    return " ".join(f"{key}={_shown(settings[key])}" for key in SETTING_TYPES)


def _shown(value) -> str:
    return "none" if value is None else str(value)


def _one_line(text: str, width: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"
