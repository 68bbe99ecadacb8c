"""Request and response bodies of the HTTP API (OpenAI shapes, plus the legacy ChatGLM `POST /`).

Field limits live here so that the OpenAPI schema says exactly what the routes accept; anything the engine
cannot honour is rejected with a 400 that names the field. Types are strict: a bool is not a number or a token
id, a number is not a string. Knows nothing of the engine.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Callable, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

MAX_TOOLS = 128          # tools (or functions) in one request, as OpenAI allows
MAX_STOP = 16            # stop strings in one request
MAX_STOP_CHARS = 1000    # characters of one stop string
MAX_PROMPTS = 256        # prompts in one completions request (each also counts against --max-queue)
MAX_EMBEDDING_INPUTS = 2048


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("is empty")
    return value


# Not Field(min_length=1): pydantic's length check refuses text with lone surrogates, which the routes clean
NonEmpty = Annotated[str, AfterValidator(_non_empty), Field(json_schema_extra={"minLength": 1})]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None


def _integral(value):
    """Floats without a fraction (1.0), also inside lists, as the integers they are: JSON Schema's `integer`
    includes them, pydantic's strict mode would refuse them (a float field takes the integer as well). Other
    floats, bools and strings are still refused."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return [_integral(v) for v in value] if isinstance(value, list) else value


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, data):
        return {k: _integral(v) for k, v in data.items()} if isinstance(data, dict) else data


def one_of(*models: type[BaseModel], key: str = "type", fallback: type[BaseModel] | None = None,
           choose: Callable[[dict], type[BaseModel] | None] | None = None):
    """A union of models told apart by the value of `key` (or chosen by `choose(value)`): a value is validated
    as the model whose `key` literal holds it, so its errors name that model's fields (pydantic tags them with
    the model's name, which the error handler leaves out). Another value is `fallback`'s error (its `key` is
    wrong), or without one an error of the union itself."""
    tags = {}
    for model in models:
        for value in get_args(model.model_fields[key].annotation):
            tags.setdefault(value, model.__name__)

    def pick(value):
        if isinstance(value, BaseModel):
            return type(value).__name__
        if not isinstance(value, dict):
            return None
        chosen, tag = choose(value) if choose else None, value.get(key)
        found = chosen.__name__ if chosen else tags.get(tag) if isinstance(tag, str) else None
        return found or (fallback.__name__ if fallback is not None else None)

    return Annotated[Union[tuple(Annotated[model, Tag(model.__name__)] for model in models)], Discriminator(pick)]


def _json_object_text(value: str) -> str:
    """Text that must hold a JSON object (a tool call's arguments); blank means {}."""
    if value.strip():
        try:
            parsed = json.loads(value, parse_constant=_no_constant)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError('must be the text of a JSON object, e.g. "{\\"city\\": \\"北京\\"}"')
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# Blank (what str.strip() removes), or JSON text between braces.
_BLANK = r"[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_OBJECT_TEXT = rf"^(?:{_BLANK}*|[ \t\n\r]*\{{[\s\S]*\}}[ \t\n\r]*)$"
# The schema says all a JSON schema can: JSON text of an object (its content keywords only annotate: that the
# text between the braces is JSON is the validator's to check).
JSONObjectText = Annotated[str, AfterValidator(_json_object_text), Field(json_schema_extra={
    "pattern": _OBJECT_TEXT, "contentMediaType": "application/json", "contentSchema": {"type": "object"}})]


class FunctionName(Model):
    name: str


class FunctionCall(Model):
    name: NonEmpty
    arguments: JSONObjectText | dict[str, Any] = "{}"


class ToolCall(Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(Model):
    type: Literal["text"]
    text: str


class _Message(Model):
    content: str | list[TextPart | str] | None = Field(None, description="text, or text parts (these models "
                                                        "read text only)")
    name: str | None = None
    tool_call_id: str | None = None
    metadata: str | None = Field(None, description="ChatGLM3 metadata line (e.g. a tool name)")


class ChatMessage(_Message):
    role: Literal["system", "user", "tool", "function", "observation", "developer"]
    tool_calls: Annotated[list[ToolCall], Field(max_length=0)] | None = Field(
        None, description="only assistant messages carry tool calls")
    function_call: None = None


class AssistantChatMessage(_Message):
    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None


class FunctionDef(Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Model):
    type: Literal["function"] = "function"
    function: FunctionName


class DemoFunction(Model):
    """One tool of the ChatGLM3 composite demo's `tools` dict; `params` become its JSON schema. Other keys are
    kept: the demo's format shows the definition to the model as it is."""
    model_config = ConfigDict(extra="allow")
    name: NonEmpty | None = None
    description: str | None = None
    params: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] | None = None


class StreamOptions(Model):
    include_usage: bool = False


class Character(Model):
    bot_name: str = Field(min_length=1)
    bot_info: str = Field(min_length=1)
    user_name: str = "用户"
    user_info: str | None = ""


class SamplingFields(Model):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class JSONSchemaSpec(Model):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema", description="the JSON schema of the answer")
    strict: bool | None = Field(None, description="accepted; the answer always follows the schema exactly")


class TextFormat(Model):
    type: Literal["text", "json_object"]


class JSONSchemaFormat(Model):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = one_of(TextFormat, JSONSchemaFormat, fallback=TextFormat)
AnyChatMessage = one_of(ChatMessage, AssistantChatMessage, key="role", fallback=ChatMessage)


# A knowledge base's name is its folder's (rag/library.py): letters of any script, digits, _ - ., not a leading dot
KB_NAME_PATTERN = r"^[\w-][\w.-]{0,63}$"
KBName = Annotated[str, Field(min_length=1, max_length=64, pattern=KB_NAME_PATTERN)]


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[AnyChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # A dict is the ChatGLM3 demo server's shape: one tool, or the composite demo's {name: definition, ...}
    tools: (Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | Tool | FunctionDef
            | Annotated[dict[NonEmpty, DemoFunction], Field(max_length=MAX_TOOLS)]
            | None) = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = Field(None, description="json_schema / json_object: the answer is "
                                                   "held to the schema by constrained decoding")
    functions: list[FunctionDef] | None = Field(None, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | FunctionName | None = None
    character: Character | None = Field(None, description="CharacterGLM profile")
    knowledge_base: KBName | None = Field(None, description="answer from this knowledge base's documents: the "
                                          "response carries `citations`")


class CompletionRequest(SamplingFields):
    model: str
    prompt: (NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=MAX_PROMPTS)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class EmbeddingRequest(Model):
    model: str
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] = Field(
        description="text or list of texts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class LegacyChatRequest(Model):
    """The ChatGLM demos' `POST /` body (api.py); 0 / empty values fall back to the demo defaults."""
    prompt: str
    model: str | None = Field(None, description="a served model or adapter name (ours; default: the model)")
    history: list[Annotated[list[str], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="[query, response] pairs")
    max_length: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, ge=0, le=2)


class LoadLoraAdapterRequest(Model):
    """vLLM's `POST /v1/load_lora_adapter` body."""
    lora_name: NonEmpty = Field(description="the name requests send as `model`: 1-128 letters, digits or . _ : / - "
                                "(starting with a letter or digit)")
    lora_path: NonEmpty = Field(description="an adapter directory on the server: a peft LoRA (adapter_config.json "
                                "and the adapter weights) or ChatGLM's P-Tuning v2 output (config.json with "
                                "pre_seq_len, the prefix encoder's weights)")


class UnloadLoraAdapterRequest(Model):
    """vLLM's `POST /v1/unload_lora_adapter` body (vLLM's `lora_int_id` is ignored)."""
    lora_name: NonEmpty


class KnowledgeBaseRequest(Model):
    name: KBName
    embedding_model: Literal["server", "none"] = Field("server", description="server: the server's "
                                                        "--embedding-model for hybrid search (keyword only when it "
                                                        "has none); none: keyword only")
    chunk_tokens: int = Field(300, ge=32, le=4096)
    overlap: int = Field(50, ge=0, le=2048)


class KnowledgeSearchRequest(Model):
    query: NonEmpty = Field(max_length=4000)
    top_k: int = Field(5, ge=1, le=100)
    mode: Literal["hybrid", "keyword", "dense"] = "hybrid"


class LegacyChatResponse(Model):
    response: str
    history: list[list[str]]
    status: int
    time: str


# --- response bodies (documented in the OpenAPI schema; the schemathesis suite checks every answer against them)

class Out(BaseModel):
    """A response body: documentation of what the routes send, not validated on the way out."""


class Status(Out):
    """GET /health and GET /ready: "ok" / "ready", or what keeps the server from serving (503)."""
    status: Literal["ok", "ready", "loading", "error", "draining", "engine stopped", "engine stuck"]
    error: str | None = None


class ModelCard(Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="an adapter's base model (null for a model)")
    root: str | None = Field(None, description="an adapter's directory")


class ModelList(Out):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(Out):
    cached_tokens: int


class Usage(Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = Field(None, description="only when part of the prompt "
                                                              "came from the prefix cache")


class TopLogprob(Out):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Out):
    content: list[TokenLogprob]


class CalledFunction(Out):
    name: str
    arguments: str


class ChatToolCall(Out):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(Out):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ChatToolCall] | None = None
    function_call: CalledFunction | None = Field(None, description="the older functions API, and ChatGLM3's "
                                                 "demo clients (model chatglm3-6b)")


FinishReason = Literal["stop", "length", "tool_calls", "function_call"]


class ChatChoice(Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str]


class ChatDelta(Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: CalledFunction | None = None


class ChatChunkChoice(Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(Out):
    """One `data:` event of a chat stream; the last one before `[DONE]` carries `usage` (stream_options)."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Out):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Out):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None


class Completion(Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Out):
    """One `data:` event of a completions stream; the usage event (stream_options) has no choices."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(Out):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(Out):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Out):
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage
