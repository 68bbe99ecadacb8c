"""ServerState: what the routes share — the engine client, the embedder, the served names, the settings, the
HTTP counters and the requests running now. Loading happens on a background thread; until it is done every model
route answers 503 (never hangs). Routes reach the model only through the client (`require_model`); a generating
route turns its request's `model` (a served name of the base, or a loaded LoRA adapter's) into the client and the
adapter id of its SamplingParams with `resolve_model`.

`liveness()` and `readiness()` answer /health and /ready from plain attributes (the engine's heartbeat, whether
its thread lives, whether the server drains): no engine round trip, so a stuck engine cannot stall them."""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass, field

from ..errors import InvalidParameterError, excerpt
from .engine_client import EngineClient
from .errors import APIError
from .limits import Limits
from .middleware import current_request
from .response_store import ResponseStore

log = logging.getLogger("glmkit")


@dataclass
class ServerSettings:
    engine_kwargs: dict = field(default_factory=dict)    # passed to glmkit.LLM
    model: str | None = None
    served_model_names: list[str] = field(default_factory=list)
    api_keys: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 256                                 # sequences in flight (prompts x n) before 429
    max_queue_tokens: int | None = None                  # their prompt + max_tokens before 429 (None: 4x the KV
                                                         # cache; a request alone above it is a 400)
    default_max_tokens: int | None = 4096                # chat requests without max_tokens (None: the context)
    embedding_model: str | None = "default"             # "default", a path, or None (no embeddings)
    open_docs: bool = False                              # /docs, /redoc, /openapi.json without the API key
    access_log: bool = True                              # one `glmkit.access` line per request
    engine_stall_s: float = 120.0                        # /health fails when one engine step runs longer
    limits: Limits = field(default_factory=Limits)       # body size, read/request timeouts, connections
    ui_path: str | None = None                           # where the web page is mounted (its own login)
    kb_dir: str | None = None                            # knowledge bases' folder (None: $GLMKIT_HOME/kb or XDG)
    reranker: str | None = None                          # a cross-encoder folder ordering retrieved passages


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.llm = None             # the model loaded in this process (routes use `client`, never this)
        self.client = None          # EngineClient
        self.embedder = None
        self.knowledge = None       # rag.service.Knowledge, made on first use (server/knowledge.py)
        self.load_error: str | None = None
        self.in_flight = 0          # admitted requests running now
        self.work_in_flight = 0     # their sequences (what --max-queue bounds)
        self.tokens_in_flight = 0   # their prompt + max_tokens (what --max-queue-tokens bounds)
        self.responses = ResponseStore()  # /v1/responses kept for previous_response_id (bounded, in memory)
        self.started = time.time()
        self.http_requests: dict[tuple[str, int], int] = {}
        self.http_seconds: dict[str, float] = {}
        self.model_usage: dict[str, ModelUsage] = {}  # /metrics: generation requests by the model name they sent
        self.adapter_dirs: dict[str, str] = dict(settings.engine_kwargs.get("adapters") or {})  # name -> directory
        self.active: set = set()    # RequestRecords of the HTTP requests running now (not probes, not /metrics)
        self.draining = False       # shutting down: new requests get 503
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def load(self) -> None:
        """Load the model (and embedder); run on a background thread at start-up."""
        from ..llm import LLM
        from .engine_client import LocalEngineClient
        from .middleware import TallyingClient

        try:
            self.llm = LLM(self.settings.model, **self.settings.engine_kwargs)
            if not self.settings.served_model_names:
                names = [default_served_name(self.settings.model)]
                if self.llm.chat_format.name == "chatglm3":  # the name ChatGLM3's demos and LangChain send
                    names.append("chatglm3-6b")
                self.settings.served_model_names = list(dict.fromkeys(names))
            clash = next((n for n in self.llm.adapters if n in self.settings.served_model_names), None)
            if clash is not None:
                raise InvalidParameterError("--adapter", clash, "is also the name the model is served under; give "
                                            "the adapter another name: --adapter NAME=DIR")
            if self.settings.embedding_model:
                from ..rag.embeddings import load_embedder

                self.embedder = load_embedder(self.settings.embedding_model)
            self.client = TallyingClient(LocalEngineClient(self.llm), self.settings.limits.request_timeout_s)
            # Loading leaves some 350,000 long-lived objects (torch, sympy through torch._dynamo); every full
            # collection walked them all with the GIL held, stalling the event loop and the engine 0.3-0.7 s
            # about every 10 s. Frozen, collections see only what requests allocate.
            gc.collect()
            gc.freeze()
            log.info("glmkit: serving %s", ", ".join(self.settings.served_model_names))
        except Exception as e:  # noqa: BLE001 - reported by /health and every route
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("glmkit: loading failed: %s", self.load_error)
        finally:
            self._ready.set()

    def require_model(self) -> EngineClient:
        """The engine client, once the model is loaded and its engine runs (else a 503)."""
        if not self.ready:
            raise APIError(503, "the model is still loading; retry in a few seconds", "server_error",
                           code="model_loading", headers={"Retry-After": "5"})
        if self.load_error:
            raise APIError(503, f"the model failed to load: {self.load_error}", "server_error", code="model_load_failed")
        if not self.client.alive:
            raise APIError(503, "the engine has stopped (see the server log); restart the server", "server_error",
                           code="engine_stopped")
        return self.client

    def resolve_model(self, name: str | None) -> tuple[EngineClient, int | None]:
        """A generating request's `model` -> (the client, the adapter id its SamplingParams carry): None for a
        served name of the base (or no name), a loaded adapter's id for its name; any other name is a 404. The
        name is noted on the request's record for the per-model counters of /metrics."""
        client = self.require_model()
        adapter_id = None
        if name is not None and name not in self.settings.served_model_names:
            adapter_id = client.adapter_id(name)
            if adapter_id is None:
                adapters = ", ".join(client.adapter_names()) or "none"
                raise APIError(404, f"model={excerpt(name)} is not served here; served models: "
                               f"{', '.join(self.settings.served_model_names)}; adapters: {adapters}",
                               "not_found_error", "model", "model_not_found")
        record = current_request.get()
        if record is not None:
            record.model = name if name is not None else self.settings.served_model_names[0]
        return client, adapter_id

    def count_model_use(self, name: str, prompt_tokens: int, generation_tokens: int) -> None:
        usage = self.model_usage.setdefault(name, ModelUsage())
        usage.requests += 1
        usage.prompt_tokens += prompt_tokens
        usage.generation_tokens += generation_tokens

    def engine_problem(self) -> dict | None:
        """Why the engine cannot serve ({"status": "engine stopped" | "engine stuck", ...}), or None."""
        if self.client is None:
            return None
        if not self.client.alive:
            return {"status": "engine stopped"}
        stalled = self.client.stalled_s()
        if stalled > self.settings.engine_stall_s:
            return {"status": "engine stuck", "error": f"one engine step has run for {stalled:.0f}s (the limit is "
                    f"{self.settings.engine_stall_s:g}s, --engine-stall-timeout)"}
        return None

    def liveness(self) -> tuple[int, dict]:
        """GET /health: 200 while the model is loaded and its engine loop makes progress (also while draining)."""
        if not self.ready:
            return 503, {"status": "loading"}
        if self.load_error:
            return 503, {"status": "error", "error": self.load_error}
        problem = self.engine_problem()
        return (503, problem) if problem else (200, {"status": "ok"})

    def readiness(self) -> tuple[int, dict]:
        """GET /ready: 200 only when a new request would be served (loaded, engine alive, not draining)."""
        status, body = self.liveness()
        if self.ready and not self.load_error and self.draining:
            return 503, {"status": "draining"}
        return (status, body) if status != 200 else (200, {"status": "ready"})

    @property
    def token_limit(self) -> int | None:
        """Tokens (prompt + max_tokens of every sequence) admitted at once: --max-queue-tokens, else four times
        what the KV cache holds (more would wait in the queue for minutes). None before the model is loaded."""
        if self.settings.max_queue_tokens:
            return self.settings.max_queue_tokens
        return 4 * self.client.kv_tokens if self.client is not None else None

    def admit(self, work: "Work") -> "Admission":
        """Count a request's work against --max-queue (sequences: prompts x n; embeddings: batches of texts) and
        --max-queue-tokens (their prompt + max_tokens): a 429 while the server is full, a 400 for a request that
        could never fit. Release the returned Admission when the request ends."""
        limit, tokens = self.settings.max_queue, self.token_limit
        if work.sequences > limit:
            raise APIError(400, f"the request asks for {work.sequences} sequences at once (prompts x n) but this "
                           f"server runs at most {limit} (--max-queue); send fewer prompts or a lower n", param="n",
                           code="invalid_value")
        if tokens is not None and work.tokens > tokens:
            raise APIError(400, f"the request may take {work.tokens} tokens (prompt + max_tokens for each of its "
                           f"sequences) but this server admits at most {tokens} at once (--max-queue-tokens); "
                           "lower max_tokens or n, or send fewer prompts", param="max_tokens", code="invalid_value")
        if self.work_in_flight + work.sequences > limit:
            raise APIError(429, f"the server has {self.work_in_flight} sequences in flight and this request adds "
                           f"{work.sequences} (max_queue={limit}); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        if tokens is not None and self.tokens_in_flight + work.tokens > tokens:
            raise APIError(429, f"the server has {self.tokens_in_flight} tokens of work in flight and this request "
                           f"adds {work.tokens} (max_queue_tokens={tokens}); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += 1
        self.work_in_flight += work.sequences
        self.tokens_in_flight += work.tokens
        return Admission(self, work)


@dataclass
class ModelUsage:
    """What the requests that named one model (a served name or an adapter) ran on the engine."""
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass(frozen=True)
class Work:
    """What one request asks of the engine: sequences, and the tokens they may hold in the KV cache."""
    sequences: int = 1
    tokens: int = 0

    @classmethod
    def of(cls, prompts: list[list[int]], params, n: int = 1) -> "Work":
        """Each prompt run n times, each sequence up to its params' max_tokens (params: one or one per prompt)."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        return cls(len(prompts) * n, n * sum(len(p) + (sp.max_tokens or 0) for p, sp in zip(prompts, per_prompt)))


class Admission:
    """One admitted request's share of the queue; release() gives it back (once, however often it is called)."""

    def __init__(self, state: ServerState, work: Work):
        self._state, self._work = state, work

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= 1
            self._state.work_in_flight -= self._work.sequences
            self._state.tokens_in_flight -= self._work.tokens
            self._state = None


def default_served_name(model: str | None) -> str:
    if model is None:
        from ..models import default

        return default.NAME.lower()
    from pathlib import Path

    return Path(model).name.removesuffix(".gguf") or "model"
