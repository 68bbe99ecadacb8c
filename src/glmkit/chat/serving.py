"""The chat-serving layer: one `ChatServing` per loaded model takes a conversation from messages (+ tools and
the request's tool choice) to prompt ids, to sampling parameters, to incremental display text, to the one
parse of the final output. The LLM API, the OpenAI and legacy routes and the terminal all go through it, so
the display and tool-call rules exist once.

Streaming is linear: a `ChatStream` decodes only a small window per step and keeps only a bounded unsettled
tail of text (chat/display.py), so each id costs O(1) amortized however long the answer already is.

Structured output: a forced tool call (`tool_choice` "required" or a named function) and a JSON
`response_format` become a grammar the engine holds the output to (chat/grammars.py, in the format's own call
syntax), carried by the ChatPrompt into the SamplingParams. The output is generated, never appended to the
prompt, so streams show what the model wrote and the parse always finds the call.

Knows the ChatFormat contract (render, parse, call_grammar, answer_grammar, stop_token_ids, and the display
hooks `replacements`, `hidden_spans`, `segment_token`, `call_starts`), SamplingParams and the typed errors. Knows
nothing of HTTP, pydantic, the engine's scheduling, or OpenAI's older `functions`/`function_call` fields (the
route translates those into tools and a tool choice before calling `render`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..engine.sampling_params import SamplingParams
from ..engine.structured import StructuredOutput
from ..errors import ContextLengthError, InvalidParameterError, excerpt
from .display import CallGate, EdgeTrim, SpanFilter, StopCut, TextDecoder, cut_at_stop
from .grammars import answer_body, grammar
from .messages import normalize_tools
from .tool_calls import ParsedOutput

# How a tool call written as text begins: JSON, a code fence, a Hermes tag. With tools declared, an answer
# starting like this is held until the end, when the parse decides whether it was a call.
CALL_STARTS = ("```", "{", "[", "<tool_call>")
TOOL_CHOICES = ("none", "auto", "required")


@dataclass
class ChatPrompt:
    """A rendered conversation: what `render` returns and `stream`/`parse` take back."""
    prompt_ids: list[int]
    tools: list[dict] | None = None                 # the tools shown to the model; None: none declared
    structured: StructuredOutput | None = None      # what the output is held to (a forced call, a JSON answer)
    # The request's stop strings, noted by `sampling_params`: display and parse end where the engine stopped.
    stop: list[str] = field(default_factory=list)
    # The output is held to a tool call: none of it is ever text, also when max_tokens cuts the call short.
    call_forced: bool = False


def check_tool_choice(choice, choice_field: str) -> None:
    if choice is None or (isinstance(choice, str) and choice in TOOL_CHOICES):
        return
    if isinstance(choice, Mapping) and choice.get("type", "function") == "function":
        function = choice.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            return
    raise InvalidParameterError(choice_field, choice, 'must be "none", "auto", "required" or '
                                '{"type": "function", "function": {"name": ...}}')


class ChatServing:
    def __init__(self, chat_format):
        self.chat_format = chat_format

    @property
    def stop_token_ids(self) -> list[int]:
        return self.chat_format.stop_token_ids

    def render(self, messages, tools=None, character=None, tool_choice=None, *, response_format=None,
               parallel_tool_calls: bool = True, choice_field: str = "tool_choice") -> ChatPrompt:
        """Messages -> prompt ids, and the grammar of the output when the request constrains it.
        `tool_choice`: None | "auto" | "none" | "required" | {"type": "function", "function": {"name": ...}};
        errors about it name `choice_field` (a route translating OpenAI's older `function_call` passes that
        name). `response_format`: None | {"type": "text"} | {"type": "json_object"} |
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}."""
        answer = answer_body(response_format)
        shown_tools, forced = self._tool_plan(normalize_tools(tools), tool_choice, choice_field)
        ids = self.chat_format.render(messages, tools=shown_tools, character=character)
        # A named choice is one call of that function (a client asking for it, e.g. LangChain's structured
        # output, reads one); "required" and "auto" may call several where the format allows.
        parallel = parallel_tool_calls and not isinstance(tool_choice, Mapping)
        calls = self.chat_format.call_grammar(shown_tools, parallel) if shown_tools else None
        if forced and calls is not None:  # the answer is a call: the response format does not apply to it
            return ChatPrompt(ids, shown_tools, StructuredOutput(grammar(calls, None), choice_field), call_forced=True)
        if answer is None:
            return ChatPrompt(ids, shown_tools, None)
        # With tools on "auto", a call or the formatted answer.
        text = grammar(calls, self.chat_format.answer_grammar(answer))
        source = "response_format.json_schema.schema" if response_format["type"] == "json_schema" else "response_format"
        return ChatPrompt(ids, shown_tools, StructuredOutput(text, source))

    def _tool_plan(self, tools: list[dict] | None, choice, choice_field: str) -> tuple[list[dict] | None, bool]:
        """-> (the tools shown to the model, whether a call is forced), as the tool choice asks."""
        check_tool_choice(choice, choice_field)
        if not tools:
            if choice not in (None, "none", "auto"):
                raise InvalidParameterError(choice_field, choice, "asks for a tool call but the request has no "
                                            f"tools; add `tools` or drop {choice_field}")
            return None, False
        if choice == "none":  # the model is not told about the tools at all
            return None, False
        names = [t["function"]["name"] for t in tools]
        if isinstance(choice, Mapping):
            forced = choice["function"]["name"]
            if forced not in names:
                raise InvalidParameterError(choice_field, choice, f"names the function {excerpt(forced)}, which is not "
                                            f"in tools ({', '.join(names)})")
            tools = [t for t in tools if t["function"]["name"] == forced]
        # "required" (or a name): a format without call syntax leaves it to the model and the tools it was shown
        return tools, choice == "required" or isinstance(choice, Mapping)

    def sampling_params(self, params: SamplingParams, prompt: ChatPrompt, max_model_len: int) -> SamplingParams:
        """A copy of params for a chat request: the format's stop ids, special tokens kept in the text (the
        parse needs them), max_tokens clamped to the room left in the context (None: all of it), and the
        prompt's output grammar (unless params bring their own). The prompt notes the stop strings."""
        num_prompt_tokens = len(prompt.prompt_ids)
        room = max_model_len - num_prompt_tokens
        if room <= 0:
            raise ContextLengthError(num_prompt_tokens, max_model_len)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        stop_ids = list(dict.fromkeys(self.stop_token_ids + list(params.extra_stop_token_ids)))
        prompt.stop = list(params.stop)
        return replace(params, max_tokens=max_tokens, extra_stop_token_ids=stop_ids, skip_special_tokens=False,
                       structured=params.structured or prompt.structured)

    def stream(self, prompt: ChatPrompt) -> ChatStream:
        """The display of one generation (one per choice)."""
        return ChatStream(self.chat_format, prompt)

    def parse(self, prompt: ChatPrompt, output_ids: list[int]) -> ParsedOutput:
        """The final output's content and tool calls (for a request that was not streamed)."""
        return _parse(self.chat_format, prompt, list(output_ids))


def _parse(chat_format, prompt: ChatPrompt, output_ids: list[int]) -> ParsedOutput:
    parsed = chat_format.parse(output_ids, prompt.tools)
    if prompt.call_forced:  # a call cut short by max_tokens does not parse; its markup is still not text
        parsed.content = ""
    elif prompt.stop:
        parsed.content = cut_at_stop(parsed.content, prompt.stop).rstrip()
    return parsed


class _Run:
    """One run of output text: the whole answer, or one ChatGLM3/GLM-4 segment (`metadata line \\n body`,
    where a non-empty metadata line names a tool: none of that segment is text)."""

    def __init__(self, chat_format, metadata_line: bool):
        self.decoder = TextDecoder(chat_format.tokenizer.decode)
        self.spans = SpanFilter(chat_format.replacements, chat_format.hidden_spans, chat_format.hides_span)
        self.trim = EdgeTrim()
        self.metadata: list[str] | None = [] if metadata_line else None  # None once the line is read
        self.num_metadata_chars = 0
        self.hidden = False
        self.shown = False  # some of its text has been shown

    def push(self, ids: list[int], final: bool = False) -> str:
        if self.hidden:
            return ""
        text = self.decoder.add(ids, final)
        if self.metadata is not None:
            text = self._after_metadata(text)
            if text is None:
                return ""
        out = self.trim.push(self.spans.push(text))
        return out + self.trim.push(self.spans.close()) if final else out

    def _after_metadata(self, text: str) -> str | None:
        """The body text after the metadata line; None while the line is unfinished or names a tool."""
        line_end = text.find("\n")
        if line_end < 0:
            self.metadata.append(text)
            self.num_metadata_chars += len(text)
            return None
        line = "".join(self.metadata) + text[:line_end]
        self.metadata = None
        if line.strip():
            self.hidden = True  # decoding stops here too: nothing of a tool call is ever shown
            return None
        return text[line_end + 1:]

    @property
    def num_held_chars(self) -> int:
        return self.spans.num_held_chars + self.trim.num_held_chars + self.num_metadata_chars


class ChatStream:
    """The display text of one generation as its ids arrive; `feed` returns what a UI appends.

    Rules: tool-call segments (ChatGLM3/GLM-4 metadata
    lines) never show; segments are split on the <|assistant|> id (not on text) and their texts joined by
    "\\n". Hidden spans (Qwen <tool_call> blocks) show only if, once closed, they are not a readable call.
    Partial UTF-8 and partial markers are held; the format's post-processing (markers, strip) applies. With
    tools declared, an answer whose start may be a call is held (CALL_STARTS, plus the format's own). When
    finished, the one parse sets `result`, and the last delta completes the shown text to `result.content`
    when that extends it (it always does for plain answers): the display never retracts text.
    """

    def __init__(self, chat_format, prompt: ChatPrompt):
        self.result: ParsedOutput | None = None
        self._format, self._prompt = chat_format, prompt
        self._output_ids: list[int] = []
        self._shown: list[str] = []
        self._stalled = False  # a finished segment without a metadata line: nothing more shows until the end
        self._gate = CallGate(CALL_STARTS + tuple(chat_format.call_starts(prompt.tools))) if prompt.tools else None
        token = chat_format.segment_token
        self._segment_id = chat_format.special(token) if token else None
        self._any_text = False
        self._run = _Run(chat_format, self._segment_id is not None)
        self._stop = StopCut(prompt.stop)

    @property
    def num_held_chars(self) -> int:
        """Text received but not yet settled (for tests and metrics): bounded for ordinary answers."""
        return self._run.num_held_chars + (self._gate.num_held_chars if self._gate else 0) + self._stop.num_held_chars

    @property
    def num_held_ids(self) -> int:
        return self._run.decoder.num_held_ids

    def feed(self, token_ids: list[int], finished: bool = False) -> str:
        """Append the generation's new ids; return the new display text. O(len(token_ids)) amortized."""
        if self.result is not None:
            raise ValueError("this ChatStream has finished; use a new one for the next generation")
        self._output_ids.extend(token_ids)
        if finished:
            return self._finish()
        if self._stalled or self._prompt.call_forced:
            return ""
        text = self._segments(token_ids)
        if self._gate is not None:
            text = self._gate.push(text)
        text = self._stop.push(text)
        if text:
            self._shown.append(text)
        return text

    def _segments(self, token_ids: list[int]) -> str:
        if self._segment_id is None:
            return self._show(self._run.push(token_ids))
        out, start = [], 0
        while True:
            try:
                end = token_ids.index(self._segment_id, start)
            except ValueError:
                break
            out.append(self._show(self._run.push(token_ids[start:end], final=True)))
            if self._run.metadata is not None:
                # A segment ended inside its metadata line: text or call is unknown until the final parse.
                self._stalled = True
                return "".join(out)
            self._run, start = _Run(self._format, True), end + 1
        out.append(self._show(self._run.push(token_ids[start:])))
        return "".join(out)

    def _show(self, text: str) -> str:
        """Segment texts are joined by "\\n" (only non-empty ones, as the parse joins them)."""
        if text and not self._run.shown:
            self._run.shown = True
            if self._any_text:
                text = "\n" + text
            self._any_text = True
        return text

    def _finish(self) -> str:
        self.result = _parse(self._format, self._prompt, self._output_ids)
        shown, content = "".join(self._shown), self.result.content
        # Content that does not extend what was shown (a call segment the parse could not read, now text in
        # the middle) cannot be streamed without retracting text; the caller has it in `result`.
        return content[len(shown):] if content.startswith(shown) else ""


def display_text(chat_format, output_ids: list[int], final: bool = False) -> str:
    """The display of a whole output so far, as a fresh ChatStream shows it (no tools declared); with `final`,
    parse(...).content. Streaming callers keep one ChatStream instead: this decodes every id on each call."""
    return ChatStream(chat_format, ChatPrompt([])).feed(list(output_ids), finished=final)
