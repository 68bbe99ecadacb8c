"""Typed errors for user mistakes.

Every message names the field, the value, the limit and the fix, so a user (or the server, which maps these
to OpenAI-shaped JSON) can act on it without reading a stack trace. Internal invariants use `assert` instead.
"""

import reprlib

EXCERPT_CHARS = 100
_SHORT_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict, _SHORT_REPR.maxtuple, _SHORT_REPR.maxset = 3, 4, 4, 4, 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = EXCERPT_CHARS


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """repr(value), cut to about `limit` characters with how much was left out: an error message names the
    value it refuses without echoing a megabyte of it back (nor building that megabyte's repr first)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{repr(value[:limit])}... ({len(value)} characters)"
    text = _SHORT_REPR.repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if isinstance(value, (list, dict, tuple, set)) and (len(value) > 4 or text.endswith("...")):
        text += f" ({len(value)} items)"
    return text


class GlmkitError(Exception):
    """Base class of every error glmkit raises on purpose."""


class ModelLoadError(GlmkitError):
    """The model directory, file, config or tokenizer cannot be used as given."""


class InvalidParameterError(GlmkitError, ValueError):
    """A request or sampling parameter is out of range or of the wrong kind."""

    def __init__(self, field: str, value, message: str):
        super().__init__(f"{field}={excerpt(value)}: {message}")
        self.field = field
        self.value = value


class KnowledgeBaseNotFound(GlmkitError):
    """No knowledge base of that name (the message lists the ones there are)."""


class ContextLengthError(GlmkitError, ValueError):
    """The prompt (plus what must be generated) does not fit the model's context."""

    def __init__(self, num_prompt_tokens: int, max_model_len: int):
        super().__init__(
            f"prompt has {num_prompt_tokens} tokens but the model accepts {max_model_len} (max_model_len); "
            "shorten the messages or raise --max-model-len if the model supports it"
        )
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len
