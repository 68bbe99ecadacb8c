"""ChatGLM2-6B: a plain-text prompt of numbered rounds, `[Round N]\\n\\n问：{query}\\n\\n答：{response}\\n\\n`.

The prompt is `[gMASK] sop` + encode(text). User text can never become a special id here because the only
special ids are the two prefix ids. The model has no system role and no tool calling: system messages are
prepended to the final query (as the official OpenAI demo does) and tools are refused. Knows nothing of the
engine.
"""

from __future__ import annotations

from ..errors import InvalidParameterError
from .base import CHATGLM_REPLACEMENTS, ChatFormat


def round_text(number: int, query: str, response: str | None) -> str:
    """One round; `response=None` leaves it open for the model to answer."""
    if response is None:
        return f"[Round {number}]\n\n问：{query}\n\n答："
    return f"[Round {number}]\n\n问：{query}\n\n答：{response}\n\n"


def dialog_pairs(messages: list[dict], format_name: str) -> tuple[str, list[tuple[str, str | None]]]:
    """Messages -> (joined system text, [(query, response)]), checking user/assistant alternate.

    The last pair's response is None when the conversation ends with the user.
    """
    system, pairs = "", []
    expected = "user"
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            system += message["content"]
            continue
        if role not in ("user", "assistant"):
            raise InvalidParameterError(f"messages[{i}].role", role,
                                        f"the {format_name} chat format has no tool calling; send only system, "
                                        "user and assistant messages")
        if role != expected:
            raise InvalidParameterError(f"messages[{i}].role", role,
                                        f"the {format_name} chat format needs user and assistant messages to "
                                        f"alternate, starting with user; expected {expected} here")
        if role == "user":
            pairs.append((message["content"], None))
        else:
            pairs[-1] = (pairs[-1][0], message["content"])
        expected = "assistant" if role == "user" else "user"
    if not pairs:
        raise InvalidParameterError("messages", f"{len(messages)} messages", "need at least one user message")
    return system, pairs


class ChatGLM2Format(ChatFormat):
    name = "chatglm2"
    required_special_tokens = ("[gMASK]", "sop")
    supports_tools = False
    replacements = CHATGLM_REPLACEMENTS

    def _render(self, messages, tools, character, add_generation_prompt):
        system, pairs = dialog_pairs(messages, self.name)
        last_query, last_response = pairs[-1]
        if last_response is not None and add_generation_prompt:
            raise InvalidParameterError("messages", f"last role {messages[-1]['role']!r}",
                                        "the last message must be from the user so the model has a query to answer")
        # The official demo concatenates the system text directly (no separator) in front of the query.
        pairs[-1] = (system + last_query, last_response)
        text = "".join(round_text(n, q, r) for n, (q, r) in enumerate(pairs[:-1], start=1))
        # Without a generation prompt the final answer follows "答：" directly, as in P-Tuning training data.
        text += round_text(len(pairs), pairs[-1][0], None) + (last_response or "")
        return [self.special("[gMASK]"), self.special("sop")] + self.tokenizer.encode(text)
