"""The terminal chat's state as data: the conversation (system prompt, greeting, user/assistant turns), the
sampling settings `/set` changes, and the JSON file `/save` writes and `/load` reads:
{"system": str | null, "messages": [{"role": "user" | "assistant", "content": str}, ...], "settings": {...}}.

Knows the settings' names and SamplingParams' validation; not how a conversation is rendered, counted or sent
(the backends do that), nor anything of the screen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.sampling_params import SamplingParams
from ..errors import InvalidParameterError

# The knobs /set changes: name -> type. Names as the flags spell them (with "_" for "-").
SETTING_TYPES = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int,
                 "repetition_penalty": float, "seed": int}
ROLES = ("user", "assistant")


class ChatInputError(ValueError):
    """A one-line problem with something typed in the chat (a /set value, a /load file); the session goes on."""


def settings_from_args(args) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "max_tokens": args.max_tokens, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


def setting_problem(settings: dict) -> tuple[str, str] | None:
    """(setting, what is wrong with its value) or None. SamplingParams is the one place that knows the ranges."""
    try:
        SamplingParams(**settings)
    except InvalidParameterError as e:
        return e.field, str(e).removeprefix(f"{e.field}={e.value!r}: ")
    return None


def check_settings(settings: dict, where: str) -> None:
    problem = setting_problem(settings)
    if problem is not None:
        raise ChatInputError(f"{where}: {problem[1]}")


def parse_setting(name: str, text: str, settings: dict) -> tuple[str, object]:
    """`/set NAME VALUE` -> (key, value), checked against the other settings; ChatInputError if it is bad."""
    key = name.replace("-", "_").lower()
    if key not in SETTING_TYPES:
        from difflib import get_close_matches

        close = get_close_matches(key, SETTING_TYPES, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ChatInputError(f"/set {name}: unknown setting; {hint}settings: {', '.join(SETTING_TYPES)}")
    kind = SETTING_TYPES[key]
    if key == "seed" and text.lower() in ("none", "off", "random"):
        return key, None
    try:
        value = kind(text)
    except ValueError:
        example = "0.7" if kind is float else "42"
        raise ChatInputError(f"/set {key} {text}: not {'a number' if kind is float else 'an integer'}; "
                             f"e.g. /set {key} {example}") from None
    check_settings({**settings, key: value}, f"/set {key} {text}")
    return key, value


@dataclass
class Conversation:
    system: str | None = None
    greeting: str | None = None     # a CharacterGLM profile's first line: the conversation starts with it
    messages: list[dict] = field(default_factory=list)  # user and assistant turns; the system prompt is apart

    def __post_init__(self):
        if not self.messages:
            self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "assistant", "content": self.greeting}] if self.greeting else []

    def rendered(self) -> list[dict]:
        """What a backend sends: the system prompt (if any) and the turns."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    @property
    def num_turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def drop_oldest_turn(self) -> bool:
        """Drop the oldest turn (a user message and its answer; a greeting alone counts as one), never the one
        holding the latest user message. False when there is nothing left to drop."""
        starts = [i for i, m in enumerate(self.messages) if m["role"] == "user" or i == 0]
        if len(starts) < 2:
            return False
        del self.messages[:starts[1]]
        return True

    # -- files -----------------------------------------------------------------------------------------
    def save(self, path: Path, settings: dict) -> None:
        data = {"system": self.system, "messages": self.messages, "settings": settings}
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path, settings: dict) -> tuple[Conversation, dict]:
        """(the conversation, the settings merged over `settings`); ChatInputError names what is wrong."""
        where = f"/load {path}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ChatInputError(f"{where}: cannot read it ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ChatInputError(f"{where}: not JSON ({e}); /save writes the format /load reads") from None
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ChatInputError(f'{where}: not a saved conversation (needs a "messages" list); '
                                 "/save writes the format /load reads")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise ChatInputError(f'{where}: "system" must be a string or null')
        messages = [_checked_message(m, i, where) for i, m in enumerate(data["messages"])]
        loaded = data.get("settings") or {}
        if not isinstance(loaded, dict):
            raise ChatInputError(f'{where}: "settings" must be an object')
        unknown = sorted(set(loaded) - set(SETTING_TYPES))
        if unknown:
            raise ChatInputError(f"{where}: unknown settings {', '.join(unknown)}; known: {', '.join(SETTING_TYPES)}")
        for key, value in loaded.items():
            if not _of_type(value, SETTING_TYPES[key]) and not (key == "seed" and value is None):
                raise ChatInputError(f"{where}: settings.{key}={value!r} must be {SETTING_TYPES[key].__name__}")
        merged = {**settings, **loaded}
        problem = setting_problem(merged)
        if problem is not None:
            raise ChatInputError(f"{where}: settings.{problem[0]}={merged[problem[0]]!r} {problem[1]}")
        conversation = cls(system=system or None, messages=messages)
        return conversation, merged


def _of_type(value, kind: type) -> bool:
    if isinstance(value, bool):  # JSON true/false are not numbers here
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def _checked_message(message, index: int, where: str) -> dict:
    if not isinstance(message, dict) or message.get("role") == "system":
        # A system message among the turns would be sent twice; the file keeps it in "system".
        raise ChatInputError(f'{where}: messages[{index}] must be a {{"role", "content"}} object of role '
                             'user or assistant (the system prompt goes in "system")')
    role, content = message.get("role"), message.get("content")
    if role not in ROLES or not isinstance(content, str):
        raise ChatInputError(f'{where}: messages[{index}] needs "role" user or assistant and a string '
                             f'"content" (got role={role!r})')
    return {"role": role, "content": content}
