"""CharacterGLM-6B: a plain-text role-play prompt built from a character profile (spec 3).

Lines joined by "\\n": the scene line, the bot's and the user's persona lines (when non-empty), one
`[{speaker}]{content}` line per message, each line's own newlines flattened to spaces, and (as the generation
prompt) a final `[{bot_name}]` line for the model to continue. Wrapped as `[gMASK] sop` + encode(text); the only special ids
are those two, so user text cannot forge anything. The model has no system role and no tools: a system
message's text is appended to the bot's persona (the maintainers' advice is to put behaviour constraints
there), and empty messages (the demos' ("", greeting) placeholder) are skipped. Knows nothing of the engine.
"""

from __future__ import annotations

from ..errors import InvalidParameterError
from .base import CHATGLM_REPLACEMENTS, ChatFormat


def character_prompt(messages: list[dict], character: dict, add_generation_prompt: bool = True) -> str:
    bot, user = character["bot_name"], character["user_name"]
    bot_info = " ".join([character["bot_info"]] + [m["content"] for m in messages if m["role"] == "system"
                                                   and m["content"]])
    lines = [f"以下是一段{bot}和{user}之间的对话。"]
    if bot_info:
        lines.append(f"关于{bot}的信息：{bot_info}")
    if character["user_info"]:
        lines.append(f"关于{user}的信息：{character['user_info']}")
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            continue
        if role not in ("user", "assistant"):
            raise InvalidParameterError(f"messages[{i}].role", role,
                                        "the characterglm chat format has no tool calling; send only system, "
                                        "user and assistant messages")
        if message["content"].strip():
            speaker = user if role == "user" else bot
            lines.append(f"[{speaker}]{message['content'].strip()}")
    lines = [line.replace("\n", " ") for line in lines]
    if add_generation_prompt:
        lines.append(f"[{bot}]")
    return "\n".join(lines)


class CharacterGLMFormat(ChatFormat):
    name = "characterglm"
    required_special_tokens = ("[gMASK]", "sop")
    supports_tools = False
    persona_as_system = False
    replacements = CHATGLM_REPLACEMENTS

    def _render(self, messages, tools, character, add_generation_prompt):
        if character is None:
            raise InvalidParameterError("character.bot_name", None,
                                        "the characterglm chat format needs a character profile: "
                                        '{"bot_name", "bot_info", "user_name", "user_info"}')
        text = character_prompt(messages, character, add_generation_prompt)
        return [self.special("[gMASK]"), self.special("sop")] + self.tokenizer.encode(text)
