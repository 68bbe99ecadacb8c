"""The FastAPI application: thin routes over ServerState and its engine client. Auth and HTTP counters are a middleware; model
loading starts in the background so the server answers (503) at once.

Routes: GET /health, GET /metrics, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
POST /v1/embeddings, POST / (legacy ChatGLM).
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import GlmkitError
from . import anthropic_routes, chat_routes, completion_routes, legacy, responses_routes
from .embeddings import encode_vector
from .errors import (APIError, api_error_handler, disconnected_handler, error_response, glmkit_error_handler,
                     http_error_handler, is_anthropic_path, unexpected_handler, validation_handler)
from .generation import ClientDisconnected
from .metrics import render_metrics
from .protocol import EmbeddingRequest
from .state import ServerSettings, ServerState

OPEN_PATHS = {"/health", "/docs", "/openapi.json", "/docs/oauth2-redirect"}


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
    app.add_exception_handler(Exception, unexpected_handler)

    # A plain ASGI middleware, not @app.middleware("http"): that wrapper hides client disconnects from
    # request.is_disconnected(), and a request whose client left must be aborted.
    app.add_middleware(AuthAndCount, state=state)

    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in settings.cors_origins)

    @app.get("/health")
    async def health():
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        snapshot = await state.client.snapshot() if state.client is not None else None
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
            raise APIError(404, f"model={model_id!r} is not served here; served models: "
                           f"{', '.join(m['id'] for m in listed)}", "not_found_error", "model", "model_not_found")
        return found[0]

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        state.require_model()
        if state.embedder is None:
            raise APIError(404, "this server has no embedding model; start it with --embedding-model (the default "
                           "one comes with pip install 'glmkit[embeddings]')",
                           "not_found_error", "model", "model_not_found")
        if req.model != state.embedder.name:
            raise APIError(404, f"model={req.model!r} is not an embedding model served here; use "
                           f"{state.embedder.name!r}", "not_found_error", "model", "model_not_found")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts or len(texts) > 2048:
            raise APIError(400, f"input has {len(texts)} texts; send 1 to 2048", param="input", code="invalid_value")
        if req.dimensions is not None and req.dimensions > state.embedder.dimensions:
            raise APIError(400, f"dimensions={req.dimensions} exceeds the model's {state.embedder.dimensions}",
                           param="dimensions", code="invalid_value")
        vectors = await asyncio.to_thread(state.embedder.embed, texts, req.dimensions)
        tokens = state.embedder.count_tokens(texts)
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


class AuthAndCount:
    """Checks `Authorization: Bearer <key>` or `x-api-key: <key>` (every route but /health and the docs) and counts requests."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), [500]
        keys = self.state.settings.api_keys
        if keys and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            headers = dict(scope["headers"])
            header = headers.get(b"authorization", b"").decode("latin-1")
            # Anthropic's clients send the key as `x-api-key`; either header is accepted on every route.
            token = (header[7:].strip() if header.lower().startswith("bearer ")
                     else headers.get(b"x-api-key", b"").decode("latin-1").strip())
            if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
                anthropic = is_anthropic_path(scope["path"])
                response = error_response(scope["path"], 401, "missing or invalid API key; send "
                                          + ("`x-api-key: <key>`" if anthropic else "`Authorization: Bearer <key>`"),
                                          "authentication_error", None, "invalid_api_key")
                await response(scope, receive, send)
                self._count(scope, 401, start)
                return

        async def send_and_note_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            self._count(scope, status[0], start)

    def _count(self, scope, status: int, start: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", "other")
        requests, seconds = self.state.http_requests, self.state.http_seconds
        requests[(path, status)] = requests.get((path, status), 0) + 1
        seconds[path] = seconds.get(path, 0.0) + time.monotonic() - start
