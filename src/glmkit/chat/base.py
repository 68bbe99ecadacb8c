"""The ChatFormat contract shared by every format, plus helpers for the ChatGLM-style output segments.

A format turns normalized messages into prompt token ids (`render`) and a finished generation into visible
text and tool calls (`parse`). What a streaming UI may show is not computed here: a format only declares its
display rules (`replacements`, `hidden_spans`/`hides_span`, `segment_token`, `call_starts`), which chat/serving.py's
ChatStream applies incrementally. Subclasses implement `_render`;
text-only formats inherit `parse`. Knows nothing of the engine, HTTP or sampling.
"""

from __future__ import annotations

from ..errors import InvalidParameterError
from .messages import normalize_messages, normalize_tools, persona_system_prompt, validate_character
from .tool_calls import ParsedOutput, ToolCall

TRAINING_TIME_MARKER = "[[训练时间]]"
# ChatGLM2/3's own response clean-up (besides strip): the training-time placeholder becomes 2023年.
CHATGLM_REPLACEMENTS = ((TRAINING_TIME_MARKER, "2023年"),)


def dedupe(ids) -> list[int]:
    return [i for n, i in enumerate(ids) if i is not None and i not in ids[:n]]


class ChatFormat:
    name = ""
    required_special_tokens: tuple[str, ...] = ()
    supports_tools = True
    # Formats without a native character profile get it as a leading system message.
    persona_as_system = True
    # Display rules, applied by `postprocess` to the final text and by ChatStream to streamed text:
    # text the post-processing rewrites (old -> new, before stripping; old strings must not overlap),
    replacements: tuple[tuple[str, str], ...] = ()
    # (opening, closing) spans of the text that hold tool calls (hidden while streaming; see hides_span),
    hidden_spans: tuple[tuple[str, str], ...] = ()
    # and the special token that starts a new output segment with its own metadata line (ChatGLM3/GLM-4).
    segment_token: str | None = None

    def __init__(self, tokenizer, eos_token_ids: list[int] | None = None, template: str | None = None):
        self.tokenizer = tokenizer
        missing = [t for t in self.required_special_tokens if t not in tokenizer.special_tokens]
        if missing:
            raise InvalidParameterError(
                "chat_format", self.name, f"needs the special tokens {missing}, which this model's tokenizer lacks; "
                "pick the format of this model (or omit chat_format to detect it)")
        self.stop_token_ids = dedupe(self._format_stop_ids() + list(eos_token_ids or []))

    def _format_stop_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def special(self, token: str) -> int:
        return self.tokenizer.special_id(token)

    # -- rendering ---------------------------------------------------------------------------------------
    def render(self, messages, tools=None, character=None, add_generation_prompt: bool = True) -> list[int]:
        msgs = normalize_messages(messages)
        tool_list = normalize_tools(tools)
        if tool_list and not self.supports_tools:
            raise InvalidParameterError("tools", f"{len(tool_list)} tools",
                                        f"the {self.name} chat format has no tool calling; send the request "
                                        "without tools, or serve a model that supports them (ChatGLM3, GLM-4, "
                                        "Qwen2.5)")
        profile = validate_character(character) if character is not None else None
        if profile is not None and self.persona_as_system:
            msgs = [{"role": "system", "content": persona_system_prompt(profile), "metadata": ""}] + msgs
            profile = None
        return self._render(msgs, tool_list, profile, add_generation_prompt)

    def _render(self, messages: list[dict], tools: list[dict] | None, character: dict | None,
                add_generation_prompt: bool) -> list[int]:
        raise NotImplementedError

    def call_grammar(self, tools: list[dict], parallel: bool) -> str | None:
        """Lark rules defining `calls`: an output that is a call to one of `tools` (several with `parallel`)
        in this format's syntax (chat/grammars.py). None: this format has no tool-call syntax."""
        return None

    def answer_grammar(self, body: str) -> str:
        """The Lark expression of a plain answer whose text matches `body`."""
        return body

    # -- output ------------------------------------------------------------------------------------------
    def postprocess(self, text: str) -> str:
        for old, new in self.replacements:
            text = text.replace(old, new)
        return text.strip()

    def hides_span(self, span: str) -> bool:
        """Whether a closed hidden span (opening + body + closing) stays hidden: it does when the final parse
        takes it as a tool call; otherwise the parse keeps it as text, and so does the display."""
        return True

    def call_starts(self, tools) -> tuple[str, ...]:
        """Openings of a tool call written as plain text in this format, besides the generic ones (JSON, a
        fence, a Hermes tag): with these tools declared, an answer starting so is held until the parse."""
        return ()

    def parse(self, output_ids: list[int], tools=None) -> ParsedOutput:
        return ParsedOutput(content=self.postprocess(self.tokenizer.decode(output_ids)), tool_calls=[])


class SegmentedFormat(ChatFormat):
    """ChatGLM3/GLM-4 output: segments separated by <|assistant|>, each `metadata line \\n body`.

    An empty metadata line marks text; a tool name marks a call, which the subclass parses in `_parse_call`.
    """
    segment_token = "<|assistant|>"

    def _split(self, output_ids: list[int]) -> list[str]:
        assistant_id = self.special(self.segment_token)
        runs: list[list[int]] = [[]]
        for token_id in output_ids:
            if token_id == assistant_id:
                runs.append([])
            else:
                runs[-1].append(token_id)
        # Split on ids, not on decoded text: a model writing the characters "<|assistant|>" as plain text
        # must not start a segment.
        return [self.tokenizer.decode(run) for run in runs]

    def _parse_call(self, metadata: str, body: str, tools) -> ToolCall | None:
        raise NotImplementedError

    def answer_grammar(self, body: str) -> str:
        # A text segment: an empty metadata line, then the body (a SentencePiece piece may start with a space).
        return '" "? "\\n" " "? ' + body

    def parse(self, output_ids: list[int], tools=None) -> ParsedOutput:
        texts, calls = [], []
        for segment in self._split(output_ids):
            metadata, sep, body = segment.partition("\n")
            if not sep:  # no metadata line at all: the original parser keeps it as text
                metadata, body = "", segment
            metadata = metadata.strip()
            call = self._parse_call(metadata, body, tools)
            if call is not None:
                calls.append(call)
            else:
                texts.append(self.postprocess(body))
        return ParsedOutput(content="\n".join(t for t in texts if t), tool_calls=calls)
