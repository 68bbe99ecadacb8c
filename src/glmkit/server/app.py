"""The FastAPI application: thin routes over ServerState and its engine client. The drain gate, auth, request
ids, HTTP counters and the access log are a middleware (middleware.py); model loading starts in the background
so the server answers (503) at once.

Routes: GET /health (liveness), GET /ready (readiness), GET /metrics, GET /v1/models (the model, its adapters,
the embedder), POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, POST / (legacy ChatGLM), and
the routers' (Responses, Anthropic Messages, vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter).
"""

from __future__ import annotations

import asyncio
import base64
import threading
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GlmkitError, excerpt
from ..rag.embeddings import BATCH as EMBED_BATCH
from . import adapter_routes, anthropic_routes, chat_routes, completion_routes, knowledge, legacy, responses_routes
from .errors import (AnthropicErrorResponse, APIError, ErrorResponse, ServerShuttingDown, api_error_handler,
                     disconnected_handler, error_response, error_responses, glmkit_error_handler,
                     http_error_handler, is_anthropic_path, unexpected_handler, validation_handler)
from .generation import ClientDisconnected, unless_client_leaves
from .metrics import render_metrics
from .limits import BodyLimit
from .middleware import PROBE_PATHS, RequestGate
from .protocol import (ChatCompletionChunk, CompletionChunk, EmbeddingList, EmbeddingRequest, ModelCard, ModelList,
                       Status)
from .anthropic_protocol import MessageStreamEvent
from .responses_schema import ResponseStreamEvent
from .state import ServerSettings, ServerState, Work


def create_app(settings: ServerSettings, load_in_background: bool = True) -> FastAPI:
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load_in_background:
            threading.Thread(target=state.load, name="glmkit-load", daemon=True).start()
        else:
            await asyncio.to_thread(state.load)
        yield
        if state.client is not None:
            state.client.shutdown()

    app = FastAPI(title="glmkit", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible and ChatGLM-compatible API over a private model.")
    app.state.glmkit = state
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(ClientDisconnected, disconnected_handler)
    app.add_exception_handler(GlmkitError, glmkit_error_handler)
    app.add_exception_handler(ServerShuttingDown, shutting_down_handler)
    app.add_exception_handler(Exception, unexpected_handler)

    # Outermost first: the gate (drain, key, id, log) sees every request before its body is read.
    app.add_middleware(BodyLimit, limits=settings.limits)
    app.add_middleware(RequestGate, state=state)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in settings.cors_origins,
                           expose_headers=["X-Request-Id", "Retry-After"])

    probe = {200: {"model": Status, "description": "Serving"},
             503: {"model": Status, "description": "Not serving: loading, failed, engine stopped or stuck, draining"}}

    @app.get("/health", responses=probe)
    async def health():
        status, body = state.liveness()
        return JSONResponse(body, status_code=status)

    @app.get("/ready", responses=probe)
    async def ready():
        status, body = state.readiness()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        snapshot = None
        if state.client is not None and state.client.alive:  # a stopped engine answers no snapshot
            snapshot = await state.client.snapshot()
        return Response(render_metrics(state, snapshot), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses={200: {"model": ModelList, "description": "The served models"},
                                      **error_responses(503)})
    async def models():
        client = state.require_model()
        names = list(settings.served_model_names) + ([state.embedder.name] if state.embedder else [])
        created = int(state.started)
        cards = [{"id": n, "object": "model", "created": created, "owned_by": "glmkit", "parent": None} for n in names]
        cards += [{"id": n, "object": "model", "created": created, "owned_by": "glmkit",
                   "parent": settings.served_model_names[0], "root": state.adapter_dirs.get(n)}
                  for n in client.adapter_names()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id:path}", responses={200: {"model": ModelCard, "description": "The model"},
                                                      **error_responses(404, 503)})
    async def model(model_id: str):
        state.require_model()
        listed = (await models())["data"]
        found = [m for m in listed if m["id"] == model_id]
        if not found:
            raise APIError(404, f"model={excerpt(model_id)} is not served here; served models: "
                           f"{', '.join(m['id'] for m in listed)}", "not_found_error", "model", "model_not_found")
        return found[0]

    @app.post("/v1/embeddings", responses={200: {"model": EmbeddingList, "description": "The embeddings"},
                                           **error_responses(400, 404, 408, 413, 429, 503)})
    async def embeddings(req: EmbeddingRequest, request: Request):
        state.require_model()
        if state.embedder is None:
            raise APIError(404, "this server has no embedding model; start it with --embedding-model (the default "
                           "one comes with pip install 'glmkit[embeddings]')",
                           "not_found_error", "model", "model_not_found")
        if req.model != state.embedder.name:
            raise APIError(404, f"model={excerpt(req.model)} is not an embedding model served here; use "
                           f"{state.embedder.name!r}", "not_found_error", "model", "model_not_found")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)  # 1 to 2048 (protocol.py)
        if req.dimensions is not None and req.dimensions > state.embedder.dimensions:
            raise APIError(400, f"dimensions={req.dimensions} exceeds the model's {state.embedder.dimensions}",
                           param="dimensions", code="invalid_value")
        # counted with the generation requests (429 beyond --max-queue), a batch of texts as one sequence
        admission = state.admit(Work(-(-len(texts) // EMBED_BATCH)))
        try:
            # queued and batched off the loop; a client that leaves takes its texts off the queue
            vectors, tokens = await unless_client_leaves(request, state.embedder.embed(texts, req.dimensions))
        finally:
            admission.release()
        return {"object": "list", "model": req.model,
                "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    app.include_router(chat_routes.router)
    app.include_router(completion_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(legacy.router)
    app.include_router(adapter_routes.router)
    app.include_router(knowledge.router)
    app.openapi = lambda: app.openapi_schema or _openapi(app, state)
    return app


# Streaming routes: their 200 is also `text/event-stream`, each event's `data:` one of these objects. OpenAI's
# streams have no `event:` line and end with `data: [DONE]`; the others name each event (`event: <type>`).
SSE_EVENTS = {"/v1/chat/completions": (ChatCompletionChunk, False), "/v1/completions": (CompletionChunk, False),
              "/v1/responses": (ResponseStreamEvent, True), "/v1/messages": (MessageStreamEvent, True)}
REF = "#/components/schemas/{model}"


def _openapi(app: FastAPI, state: ServerState) -> dict:
    """FastAPI's schema of the routes, made to say what the server does: no 422 (validation errors are 400s,
    documented per route), integer bounds as exact integers (FastAPI's schema model turns them into floats: 2**63
    would read 9.223372036854776e18), the SSE streams, the API key when the server has one, and, once the models
    are loaded, the token ids the model reads and the embedding dimensions (kept from then on)."""
    settings = state.settings
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {})
    definitions = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        definitions.pop(name, None)
    _exact_integers(schema)
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            operation["responses"].pop("422", None)
            if method == "post" and path in SSE_EVENTS:
                model, named = SSE_EVENTS[path]
                _, defs = models_json_schema([(model, "serialization")], ref_template=REF)
                for name, definition in defs.get("$defs", {}).items():
                    definitions.setdefault(name, definition)
                operation["responses"]["200"]["content"]["text/event-stream"] = {"schema": _sse_event(model, named)}
            if settings.api_keys and path not in PROBE_PATHS:
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                model = AnthropicErrorResponse if is_anthropic_path(path) else ErrorResponse
                operation["responses"]["401"] = {"description": "Missing or invalid API key", "content": {
                    "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}
    if settings.api_keys:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                         "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
    if state.ready and state.client is not None:
        _token_ids(definitions["CompletionRequest"]["properties"]["prompt"], state.client.vocab_size - 1)
        if state.embedder is not None:
            dimensions = definitions["EmbeddingRequest"]["properties"]["dimensions"]["anyOf"][0]
            dimensions["maximum"] = state.embedder.dimensions
        app.openapi_schema = schema
    return schema


def _token_ids(value, largest: int) -> None:
    """The model's largest token id as the maximum of the token ids in this schema."""
    if isinstance(value, dict):
        if value.get("type") == "integer":
            value["maximum"] = largest
        for item in value.values():
            _token_ids(item, largest)
    elif isinstance(value, list):
        for item in value:
            _token_ids(item, largest)


def _sse_event(model, named: bool) -> dict:
    """One server-sent event as OpenAPI describes a stream's items: `data` is the JSON of `model` (or of an
    error object, for OpenAI's streams, or the closing `[DONE]`)."""
    payload = {"type": "string", "contentMediaType": "application/json",
               "contentSchema": {"$ref": REF.format(model=model.__name__)}}
    if named:
        return {"type": "object", "required": ["event", "data"],
                "properties": {"event": {"type": "string"}, "data": payload}}
    payload["contentSchema"] = {"anyOf": [payload["contentSchema"],
                                          {"$ref": REF.format(model=ErrorResponse.__name__)}]}
    return {"type": "object", "required": ["data"],
            "properties": {"event": {"const": "message"}, "data": {"if": {"const": "[DONE]"}, "else": payload}}}


def _exact_integers(value) -> None:
    """Integral float bounds back to the integers the models state."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and isinstance(item, float) \
                    and item.is_integer():
                value[key] = int(item)
            else:
                _exact_integers(item)
    elif isinstance(value, list):
        for item in value:
            _exact_integers(item)


async def shutting_down_handler(request, exc: ServerShuttingDown):
    """A request still waiting for its answer when the drain ended: the engine aborted it."""
    return error_response(request.url.path, 503, str(exc), "server_error", None, "server_shutting_down",
                          {"Retry-After": "5", "Connection": "close"})


def encode_vector(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
