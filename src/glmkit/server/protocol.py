"""Request and response bodies of the HTTP API (OpenAI shapes, plus the legacy ChatGLM `POST /`).

Field limits live here so that the OpenAPI schema says exactly what the routes accept; anything the engine
cannot honour is rejected with a 400 that names the field. Types are strict: a bool is not a number or a token
id, a number is not a string. Knows nothing of the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOOLS = 128          # tools (or functions) in one request, as OpenAI allows
MAX_STOP = 16            # stop strings in one request
MAX_STOP_CHARS = 1000    # characters of one stop string
MAX_PROMPTS = 256        # prompts in one completions request (each also counts against --max-queue)
MAX_EMBEDDING_INPUTS = 2048

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), strict=True)


class FunctionCall(Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Model):
    role: Literal["system", "user", "assistant", "tool", "function", "observation", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None
    metadata: str | None = Field(None, description="ChatGLM3 metadata line (e.g. a tool name)")


class FunctionDef(Model):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Model):
    type: Literal["function"] = "function"
    function: dict[str, str]


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


class ResponseFormat(Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # A dict is the ChatGLM3 demo server's shape: one tool, or the composite demo's {name: definition, ...}
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | dict[str, Any] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = Field(None, description="json_schema / json_object: the answer is "
                                                   "held to the schema by constrained decoding")
    functions: list[FunctionDef] | None = Field(None, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | dict[str, str] | None = None
    character: Character | None = Field(None, description="CharacterGLM profile")


class CompletionRequest(SamplingFields):
    model: str
    prompt: (str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] | list[int]
             | Annotated[list[list[int]], Field(max_length=MAX_PROMPTS)])
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
    history: list[list[str]] | None = None
    max_length: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, ge=0, le=2)


class LegacyChatResponse(Model):
    response: str
    history: list[list[str]]
    status: int
    time: str
