"""GET /metrics: an engine snapshot, the HTTP counters and the per-model counters (the model's served names and
its adapters: requests that reached the engine, their prompt and generated tokens) in the Prometheus text
format."""

from __future__ import annotations

from ..engine.metrics import EngineSnapshot


def _label(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _line(name: str, value, labels: dict | None = None) -> str:
    label = "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}" if labels else ""
    return f"{name}{label} {value}"


def _histogram(name: str, help_text: str, h) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for bound, count in zip(h.bounds, h.counts):
        lines.append(_line(f"{name}_bucket", count, {"le": bound}))
    lines += [_line(f"{name}_bucket", h.count, {"le": "+Inf"}), _line(f"{name}_sum", round(h.total, 6)),
              _line(f"{name}_count", h.count)]
    return lines


def render_metrics(state, snapshot: EngineSnapshot | None) -> str:
    lines = ["# HELP glmkit_ready 1 once the model is loaded", "# TYPE glmkit_ready gauge",
             _line("glmkit_ready", int(state.ready and not state.load_error)),
             "# TYPE glmkit_http_requests_in_flight gauge", _line("glmkit_http_requests_in_flight", state.in_flight),
             "# HELP glmkit_admitted_sequences their sequences (what --max-queue bounds)",
             "# TYPE glmkit_admitted_sequences gauge", _line("glmkit_admitted_sequences", state.work_in_flight),
             "# HELP glmkit_admitted_tokens their prompt + max_tokens (what --max-queue-tokens bounds)",
             "# TYPE glmkit_admitted_tokens gauge", _line("glmkit_admitted_tokens", state.tokens_in_flight),
             "# HELP glmkit_http_requests_total HTTP requests by route and status", "# TYPE glmkit_http_requests_total counter"]
    for (path, status), count in sorted(state.http_requests.items()):
        lines.append(_line("glmkit_http_requests_total", count, {"route": path, "status": status}))
    lines.append("# TYPE glmkit_http_request_seconds_total counter")
    for path, seconds in sorted(state.http_seconds.items()):
        lines.append(_line("glmkit_http_request_seconds_total", round(seconds, 6), {"route": path}))
    lines += _per_model(state)
    if snapshot is not None:
        for name, value in snapshot.gauges.items():
            lines += [f"# TYPE glmkit_{name} gauge", _line(f"glmkit_{name}", value)]
        s = snapshot.stats
        for name, value in (("prompt_tokens_total", s.num_prompt_tokens), ("generation_tokens_total", s.num_generated_tokens),
                            ("requests_finished_total", s.num_requests_finished),
                            ("requests_aborted_total", s.num_requests_aborted), ("preemptions_total", s.num_preemptions)):
            lines += [f"# TYPE glmkit_{name} counter", _line(f"glmkit_{name}", value)]
        lines += _histogram("glmkit_time_to_first_token_seconds", "from arrival to the first token", s.time_to_first_token)
        lines += _histogram("glmkit_time_per_output_token_seconds", "mean decode time per token of a request",
                            s.time_per_output_token)
    return "\n".join(lines) + "\n"


def _per_model(state) -> list[str]:
    """Every served name and loaded adapter (0 until used), and any name used before (an unloaded adapter)."""
    names = list(state.settings.served_model_names)
    if state.client is not None:
        names += state.client.adapter_names()
    usage = state.model_usage
    lines = []
    for metric, field, help_text in (
            ("glmkit_model_requests_total", "requests", "generation requests by the model they named (a served "
             "name of the model or an adapter)"),
            ("glmkit_model_prompt_tokens_total", "prompt_tokens", "their prompt tokens"),
            ("glmkit_model_generation_tokens_total", "generation_tokens", "their generated tokens")):
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        for name in dict.fromkeys(names + list(usage)):
            lines.append(_line(metric, getattr(usage[name], field) if name in usage else 0, {"model": name}))
    return lines
