"""LangChain's own standard integration tests (`langchain-tests`' ChatModelIntegrationTests) for `ChatOpenAI`
against the shared real `glmkit serve` of the default model (the session `server` fixture): invoke, batch,
streaming (also stream_events v3), usage metadata (also streamed), stop sequences, model override, tool calling
and `tool_choice` ("any" and a named tool), tool-message histories, an agent loop, structured output with
`method="json_schema"` and (second class) `method="function_calling"`, and JSON mode.

Wiring: the standard tests build the model as `chat_model_class(**chat_model_params)` (test_stop_sequence does
so itself, outside the `model` fixture), so the server's URL, known only once the session fixture has started
the server, is put on the class by a class-scoped autouse fixture, which runs before any test of the class.

Tests overridden here are ones the 0.5B model fails by answering wrongly; each is marked xfail (not strict)
with the evidence. langchain-tests' own test_no_overrides_DO_NOT_OVERRIDE checks that nothing else is
overridden.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests

from default_server import ALIAS, MODEL

# The async standard tests need pytest-asyncio's mark (the project runs it in strict mode); the mark reaches the
# sync tests too, where it means nothing. One event loop for the module: langchain-openai caches its async
# HTTP client per base URL, and a client made on a closed loop fails the next test.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("ignore:The test <Function .*> is marked with '@pytest.mark.asyncio' "
                                         "but it is not an async function")]

# The whole suite is about 50 generations of up to 100 tokens by the default model: 10-12 minutes on 2 CPU cores,
# more than the rest of the suite's budget. By default only what this file exists for runs (tool calling, forced
# tool choice, structured output by json_schema and by function calling, JSON mode) plus the suite's own
# no-overrides check (each class's CORE), under 3 minutes; GLMKIT_LANGCHAIN_SUITE=1 runs all of it (README, Tests).
FULL_SUITE = bool(os.environ.get("GLMKIT_LANGCHAIN_SUITE"))


class _GlmkitChatOpenAI(ChatModelIntegrationTests):
    """What the test classes share: the server, the model's parameters and what glmkit supports."""

    base_url: str | None = None  # set from the session `server` fixture before the class's first test
    CORE = ("test_no_overrides_DO_NOT_OVERRIDE", "test_tool_calling", "test_tool_choice", "test_structured_output",
            "test_json_mode")  # by name, or by name with its parameters

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _glmkit_server(cls, server):
        cls.base_url = server.url + "/v1"

    @pytest.fixture(autouse=True)
    def _core_unless_full(self, request):
        if not FULL_SUITE and request.node.originalname not in self.CORE and request.node.name not in self.CORE:
            pytest.skip("outside the core subset; GLMKIT_LANGCHAIN_SUITE=1 runs LangChain's whole standard suite")

    @property
    def chat_model_class(self) -> type[ChatOpenAI]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # CI decodes on 2 CPU cores: answers of at most 100 tokens (a joke as JSON takes about 45), a generous
        # timeout, no retries (they would hide errors and double the time). Greedy with a frequency penalty:
        # greedy alone, the 0.5B model answers "Tell me a joke about cats." under the Joke schema by repeating
        # "It's like a superhero, but it's not as strong as a superhero." inside the setup string until
        # max_tokens (seen from 2026-12-01 on, also at the last commit that had passed; 0.5 was not enough).
        return {"base_url": self.base_url, "api_key": "x", "model": MODEL, "temperature": 0, "max_tokens": 100,
                "frequency_penalty": 1.0, "timeout": 300, "max_retries": 0, "stream_usage": True}

    # What glmkit serves: tools with tool_choice ("any" is sent as "required"; a named function), structured
    # output through response_format json_schema or a forced tool call, JSON mode (json_object), usage (also
    # streamed, with stream_options.include_usage), and the model under a second name.
    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return ALIAS  # the same model, also served under this name; the response names the model asked for

    # Text-only models: no images, audio, PDFs or video, no Anthropic-format content blocks; no VCR cassettes.
    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def enable_vcr_tests(self) -> bool:
        return False


class TestGlmkitChatOpenAI(_GlmkitChatOpenAI):
    """The whole standard suite; structured output through response_format json_schema."""

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "json_schema"}

    @pytest.mark.xfail(strict=False, reason=(
        "the 0.5B model loops: for 'Give me a joke about cats, include the punchline.' under the Joke schema "
        "(punchline: string | null), greedy, it writes a rambling setup, then repeats \"He's like a superhero "
        "who can fly and run, and he's also a superhero who can speak and talk.\" inside the punchline string "
        "until max_tokens (also at 250 tokens), so the JSON never closes (finish_reason length -> "
        "LengthFinishReasonError); the other three requests of the test are answered correctly"))
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)


class TestGlmkitChatOpenAIFunctionCalling(_GlmkitChatOpenAI):
    """The structured-output tests again with `method="function_calling"`: the schema becomes a tool that
    ChatOpenAI forces by name (a named `tool_choice`, held to the tool's schema by the server's grammar).
    Everything else, and the async and pydantic-v1 variants (the same requests), ran in the class above."""

    RUN_HERE = ("test_structured_output", "test_structured_output_optional_param")
    CORE = ("test_structured_output[pydantic]",)  # the same requests with a typeddict or JSON schema: above

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        return {"method": "function_calling"}

    @pytest.fixture(autouse=True)
    def _structured_output_only(self, request):
        if request.node.originalname not in self.RUN_HERE:
            pytest.skip("run by TestGlmkitChatOpenAI; this class reruns only the structured-output tests")
