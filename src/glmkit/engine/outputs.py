"""What the engine hands back: a Delta per sequence per step, and whole RequestOutputs for the LLM API."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Delta:
    request_id: str
    index: int                      # choice index (n > 1)
    text: str                       # new text since the last delta
    token_ids: list[int]            # new ids since the last delta (a stop token is not included)
    finish_reason: str | None = None   # "stop" | "length" | "abort" once finished
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # per new token: (token id, logprob, [(alternative id, logprob), ...]) when logprobs were asked for
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    num_cached_tokens: int = 0      # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    tool_calls: list = field(default_factory=list)
    logprobs: list | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    # The first choice, flat, as most callers want it.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def tool_calls(self) -> list:
        return self.outputs[0].tool_calls
