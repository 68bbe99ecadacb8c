"""Chat formats: messages (+ tools, + character profile) -> prompt token ids, and model output -> visible text
plus tool calls (never eval); and the chat-serving layer over a format (`ChatServing`: render with a tool
choice, sampling params, incremental display, the one final parse).

`get_chat_format` picks the format from the tokenizer and model name unless one is named. Knows nothing of
the engine, sampling or HTTP.
"""

from __future__ import annotations

from ..errors import InvalidParameterError, ModelLoadError
from .base import ChatFormat
from .characterglm import CharacterGLMFormat
from .chatglm2 import ChatGLM2Format
from .chatglm3 import ChatGLM3Format
from .glm4 import GLM4Format
from .jinja import JinjaFormat
from .messages import normalize_messages
from .serving import ChatPrompt, ChatServing, ChatStream
from .tool_calls import ParsedOutput, ToolCall

FORMATS = ("chatglm2", "chatglm3", "characterglm", "glm4", "jinja")
_CLASSES = {"chatglm2": ChatGLM2Format, "chatglm3": ChatGLM3Format, "characterglm": CharacterGLMFormat,
            "glm4": GLM4Format, "jinja": JinjaFormat}

__all__ = ["ChatFormat", "ChatPrompt", "ChatServing", "ChatStream", "ParsedOutput", "ToolCall", "get_chat_format",
           "FORMATS", "normalize_messages", "detect_chat_format"]


def detect_chat_format(tokenizer, model_type: str, model_name: str = "", template: str | None = None) -> str:
    """The format a checkpoint was trained with, from its tokenizer kind and name."""
    from ..tokenizers.chatglm_sp import ChatGLMSPTokenizer
    from ..tokenizers.glm4 import GLM4Tokenizer

    name = (model_name or "").lower()
    if isinstance(tokenizer, ChatGLMSPTokenizer):
        if "character" in name:
            return "characterglm"
        return "chatglm2" if "chatglm2" in name else "chatglm3"
    if isinstance(tokenizer, GLM4Tokenizer):
        return "glm4"
    # Llama/Qwen checkpoints, and the GLM -hf repos (model_type "glm"), ship a Jinja template.
    if template or getattr(tokenizer, "chat_template", None):
        return "jinja"
    raise ModelLoadError(
        f"cannot tell the chat format of model {model_name or '?'!r} (model_type={model_type!r}): its tokenizer "
        f"has no chat_template; pass chat_format= one of {', '.join(FORMATS)} (e.g. 'glm4' for a GLM-4 "
        "tokenizer.json), or a chat template")


def get_chat_format(name: str | None, *, tokenizer, model_type: str, model_name: str = "",
                    eos_token_ids: list[int] | None = None, template: str | None = None) -> ChatFormat:
    if name is None:
        name = detect_chat_format(tokenizer, model_type, model_name, template)
    if name not in _CLASSES:
        raise InvalidParameterError("chat_format", name,
                                    f"must be one of {', '.join(FORMATS)} (or omitted to detect it from the model)")
    return _CLASSES[name](tokenizer, eos_token_ids=eos_token_ids, template=template)
