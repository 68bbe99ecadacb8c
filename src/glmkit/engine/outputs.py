"""What the engine hands back: a Delta per sequence per step; whole RequestOutputs (folded from the deltas by
OutputCollector) for callers that wait for the end."""

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
    num_cached_tokens: int = 0      # prompt tokens served from the prefix cache

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens over every choice (a stop token is not counted)."""
        return sum(len(o.token_ids) for o in self.outputs)

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


class OutputCollector:
    """Folds one request's deltas into a RequestOutput; texts are joined once at the end, so a long answer costs
    linear time."""

    def __init__(self, request_id: str, prompt_ids: list[int], n: int):
        self.output = RequestOutput(request_id, prompt_ids, [CompletionOutput(i, "", [], None) for i in range(n)])
        self._texts: list[list[str]] = [[] for _ in range(n)]

    def add(self, d: Delta) -> None:
        out = self.output.outputs[d.index]
        self._texts[d.index].append(d.text)
        out.token_ids += d.token_ids
        if d.logprobs:
            out.logprobs = (out.logprobs or []) + d.logprobs
        out.finish_reason, out.stop_reason = d.finish_reason, d.stop_reason
        if d.finished:
            self.output.num_cached_tokens = d.num_cached_tokens

    def result(self) -> RequestOutput:
        for out, texts in zip(self.output.outputs, self._texts):
            out.text = "".join(texts)
        return self.output
