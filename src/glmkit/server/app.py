"""The FastAPI application: thin routes over ServerState and its engine client. The drain gate, auth, request
ids, HTTP counters and the access log are a middleware (middleware.py); model loading starts in the background
so the server answers (503) at once.

Routes: GET /health (liveness), GET /ready (readiness), GET /metrics, GET /v1/models, POST /v1/chat/completions,
POST /v1/completions, POST /v1/embeddings, POST / (legacy ChatGLM).
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GlmkitError, excerpt
from . import anthropic_routes, chat_routes, completion_routes, legacy, responses_routes
from .embeddings import BATCH as EMBED_BATCH, encode_vector
from .errors import (APIError, ServerShuttingDown, api_error_handler, disconnected_handler, error_response,
                     glmkit_error_handler, http_error_handler, unexpected_handler, validation_handler)
from .generation import ClientDisconnected, unless_client_leaves
from .metrics import render_metrics
from .limits import BodyLimit
from .middleware import RequestGate
from .protocol import EmbeddingRequest
from .state import ServerSettings, ServerState


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

    @app.get("/health")
    async def health():
        status, body = state.liveness()
        return JSONResponse(body, status_code=status)

    @app.get("/ready")
    async def ready():
        status, body = state.readiness()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        snapshot = None
        if state.client is not None and state.client.alive:  # a stopped engine answers no snapshot
            snapshot = await state.client.snapshot()
        return Response(render_metrics(state, snapshot), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        state.require_model()
        names = list(settings.served_model_names) + ([state.embedder.name] if state.embedder else [])
        created = int(state.started)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "glmkit"}
                                           for n in names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.require_model()
        listed = (await models())["data"]
        found = [m for m in listed if m["id"] == model_id]
        if not found:
            raise APIError(404, f"model={excerpt(model_id)} is not served here; served models: "
                           f"{', '.join(m['id'] for m in listed)}", "not_found_error", "model", "model_not_found")
        return found[0]

    @app.post("/v1/embeddings")
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
        admission = state.admit(-(-len(texts) // EMBED_BATCH))
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
    return app


async def shutting_down_handler(request, exc: ServerShuttingDown):
    """A request still waiting for its answer when the drain ended: the engine aborted it."""
    return error_response(request.url.path, 503, str(exc), "server_error", None, "server_shutting_down",
                          {"Retry-After": "5", "Connection": "close"})
