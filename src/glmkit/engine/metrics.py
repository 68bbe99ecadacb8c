"""EngineStats: the counters a /metrics endpoint exports, and EngineSnapshot, a copy of them with the cache
gauges taken at one moment (what crosses from the engine thread to the server). Plain numbers; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Histogram:
    """Cumulative buckets in seconds, Prometheus style."""
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self):
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1


LATENCY_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class EngineStats:
    num_prompt_tokens: int = 0          # prefilled (computed) prompt tokens
    num_generated_tokens: int = 0
    num_requests_finished: int = 0
    num_requests_aborted: int = 0
    num_preemptions: int = 0
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(LATENCY_BOUNDS))


@dataclass
class EngineSnapshot:
    gauges: dict[str, float]   # requests running/waiting, KV blocks used/free/total, prefix-cache hits
    stats: EngineStats         # a copy: the engine keeps counting into its own
