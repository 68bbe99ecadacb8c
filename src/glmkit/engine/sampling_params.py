"""SamplingParams: how one request is decoded (field names follow vLLM's). Validates itself: a bad value
raises InvalidParameterError naming the field, the value and the allowed range."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidParameterError
from .structured import StructuredOutput


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0 or -1: no top-k cut
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = None   # None: until a stop or the context is full
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # the output is held to this grammar (constrained decoding)
    extra_stop_token_ids: list[int] = field(default_factory=list, repr=False)  # set by chat formats
    # Not sampling, but it travels with the request: the loaded adapter (its engine id) that computes it; None:
    # the base model. Set by LLM / the server from the adapter's name.
    adapter_id: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("n", self.n, isinstance(self.n, int) and 1 <= self.n <= 128, "must be an integer in [1, 128]"),
            ("temperature", self.temperature, 0.0 <= self.temperature <= 100.0, "must be in [0, 100]; 0 means greedy"),
            ("top_p", self.top_p, 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= -1, "must be -1, 0 (off) or a positive integer"),
            ("min_p", self.min_p, 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty, 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("presence_penalty", self.presence_penalty, -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", self.frequency_penalty, -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("max_tokens", self.max_tokens, self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "must be a positive integer (or None for 'until the context is full')"),
            ("min_tokens", self.min_tokens, isinstance(self.min_tokens, int) and self.min_tokens >= 0, "must be >= 0"),
            ("logprobs", self.logprobs, self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             "must be an integer in [0, 20]"),
            ("stop", self.stop, all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
             "must be up to 16 non-empty strings"),
            ("seed", self.seed, self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("structured", self.structured, self.structured is None or isinstance(self.structured, StructuredOutput),
             "must be a StructuredOutput (e.g. StructuredOutput.json_schema(schema))"),
        ]
        for name, value, ok, message in checks:
            if not ok:
                raise InvalidParameterError(name, value, message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
