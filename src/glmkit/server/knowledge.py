"""Knowledge bases over HTTP, and answers grounded in them.

Routes (auth as every other route):
    GET    /v1/knowledge_bases                        the knowledge bases
    POST   /v1/knowledge_bases                        create one {name, embedding_model: server|none, ...}
    GET    /v1/knowledge_bases/{name}                 its files
    DELETE /v1/knowledge_bases/{name}
    PUT    /v1/knowledge_bases/{name}/files/{file}    add or replace a file: the body is the file's bytes
    DELETE /v1/knowledge_bases/{name}/files/{file}
    POST   /v1/knowledge_bases/{name}/search          {query, top_k, mode} -> the passages

`knowledge_base` on /v1/chat/completions retrieves passages for the last user message, puts them in its turn
and adds `citations` to the answer (on the first chunk when streaming). Nothing relevant found: the answer is
"not in the documents", without generating. Streamed, the citations come before the answer, so they carry no
`cited` flag (the answer's [n] marks say which were used); the full response marks each.

Indexing and searching run on worker threads, never on the event loop. Uploaded files are kept in the
knowledge base's folder (`files/`), so the index can be rebuilt from them."""

from __future__ import annotations

import asyncio
import shutil
import threading
import uuid
from pathlib import Path

from fastapi import APIRouter, Path as PathParam, Request
from fastapi.responses import StreamingResponse

from ..errors import GlmkitError, InvalidParameterError, KnowledgeBaseNotFound, excerpt
from . import streaming as sse
from .errors import APIError, error_responses
from .protocol import KB_NAME_PATTERN, KnowledgeBaseRequest, KnowledgeSearchRequest

# Path parameters with the schema's own limits, so a request the schema allows is never refused for its name
Name = PathParam(pattern=KB_NAME_PATTERN, description="the knowledge base's name")
File = PathParam(pattern=r"^([\w\- ][\w\-. ]*/)*[\w\- ][\w\-. ]*\.(?i:txt|md|markdown|html|htm|pdf|docx)$",
                 description="the file's name in the knowledge base, e.g. manuals/install.pdf")

router = APIRouter()
_lock = threading.Lock()  # making the server's Knowledge
_creating = threading.Lock()  # check-and-create of one name


def knowledge_of(state):
    """The server's Knowledge, made on first use once the model is loaded (its tokenizer sizes the chunks)."""
    client = state.require_model()
    with _lock:
        if getattr(state, "knowledge", None) is None:
            from ..rag import require
            from ..rag.service import Knowledge, embedding_spec

            try:
                require()
            except GlmkitError as e:
                raise APIError(501, str(e), "server_error", code="not_installed")
            spec = embedding_spec(state.settings.embedding_model) if state.embedder is not None else None
            root = Path(state.settings.kb_dir).expanduser() if state.settings.kb_dir else None
            state.knowledge = Knowledge(lambda text: len(client.tokenizer.encode(text)),
                                        state.settings.served_model_names[0], root, spec,
                                        {spec: state.embedder} if spec else None, state.settings.reranker)
        return state.knowledge


async def _run(fn, *args, param: str | None = None):
    try:
        return await asyncio.to_thread(fn, *args)
    except InvalidParameterError as e:
        raise APIError(400, str(e), param=e.field, code="invalid_value")
    except KnowledgeBaseNotFound as e:
        raise APIError(404, str(e), "not_found_error", param, "knowledge_base_not_found")
    except GlmkitError as e:
        raise APIError(400, str(e), "invalid_request_error", param, "invalid_value")


def _summary(kb) -> dict:
    return {"object": "knowledge_base", "name": kb.name, "files": len(kb.files()), "chunks": kb.count(),
            "embedding_model": kb.settings.embedding or None}


@router.get("/v1/knowledge_bases", responses=error_responses(503))
async def list_knowledge_bases(request: Request):
    k = knowledge_of(request.app.state.glmkit)

    def listing():
        return [_summary(k.open(name)) for name in k.library.names()]
    return {"object": "list", "data": await _run(listing)}


@router.post("/v1/knowledge_bases", status_code=201, responses=error_responses(400, 409, 503))
async def create_knowledge_base(req: KnowledgeBaseRequest, request: Request):
    state = request.app.state.glmkit
    k = knowledge_of(state)
    def create():
        from ..rag.store import Settings

        with _creating:  # two requests for one name: the second is a 409, not a store error
            if k.library.exists(req.name):
                return None
            if req.embedding_model == "server" and k.embedding is not None:
                return k.create(req.name, req.chunk_tokens, req.overlap)
            return k.library.create(req.name, Settings(None, None, req.chunk_tokens, req.overlap, k.tokenizer))
    kb = await _run(create, param="name")
    if kb is None:
        raise APIError(409, f"name={excerpt(req.name)}: a knowledge base of that name exists; add files to it "
                       "or delete it first", param="name", code="already_exists")
    return _summary(kb)


@router.get("/v1/knowledge_bases/{name}", responses=error_responses(400, 404, 503))
async def show_knowledge_base(request: Request, name: str = Name):
    k = knowledge_of(request.app.state.glmkit)

    def show():
        kb = k.open(name)
        return {**_summary(kb), "data": [vars(f) for f in kb.files()]}
    return await _run(show)


@router.delete("/v1/knowledge_bases/{name}", responses=error_responses(400, 404, 503))
async def delete_knowledge_base(request: Request, name: str = Name):
    k = knowledge_of(request.app.state.glmkit)
    await _run(k.open, name)
    await _run(k.delete, name)
    return {"object": "knowledge_base.deleted", "name": name, "deleted": True}


def _upload_path(kb, source: str) -> Path:
    """Where an uploaded file is kept: under the knowledge base's files/ folder, never outside it."""
    parts = Path(source).parts
    if not parts or any(p in ("..", "") or p.startswith(".") for p in parts) or Path(source).is_absolute():
        raise APIError(400, f"file={excerpt(source)}: a file name must be a relative path without '..' or hidden "
                       "parts, e.g. manuals/install.pdf", param="file", code="invalid_value")
    return kb.path / "files" / Path(*parts)


@router.put("/v1/knowledge_bases/{name}/files/{source:path}", responses=error_responses(400, 404, 413, 503),
            openapi_extra={"requestBody": {"required": True, "description": "the file's bytes", "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def put_file(request: Request, name: str = Name, source: str = File):
    """The body is the file (at most --max-body-size, a 413 beyond). It is indexed from a scratch copy and takes
    its place under files/ only once indexed: a bad upload never replaces a good file."""
    from ..rag.loaders import SUPPORTED

    k = knowledge_of(request.app.state.glmkit)
    kb = await _run(k.open, name)
    target = _upload_path(kb, source)
    if target.suffix.lower() not in SUPPORTED:
        raise APIError(400, f"file={excerpt(source)}: unsupported type; supported: {', '.join(sorted(SUPPORTED))}",
                       param="file", code="invalid_value")
    body = await request.body()

    def store():
        scratch = kb.path / "incoming" / uuid.uuid4().hex / target.name
        scratch.parent.mkdir(parents=True)
        try:
            scratch.write_bytes(body)
            report = k.add(name, [scratch], progress=False, named={scratch: source})
            if not report.skipped:
                target.parent.mkdir(parents=True, exist_ok=True)
                scratch.replace(target)
            return report
        finally:
            shutil.rmtree(scratch.parent, ignore_errors=True)
    report = await _run(store)
    if report.skipped:
        raise APIError(400, f"file={excerpt(source)}: {report.skipped[0][1]}", param="file", code="unreadable_file")
    return {"object": "knowledge_base.file", "name": name, "file": source, **report.as_dict()}


@router.delete("/v1/knowledge_bases/{name}/files/{source:path}", responses=error_responses(400, 404, 503))
async def delete_file(request: Request, name: str = Name, source: str = File):
    k = knowledge_of(request.app.state.glmkit)
    kb = await _run(k.open, name)
    if not await _run(kb.remove, source):
        raise APIError(404, f"knowledge base {excerpt(name)} has no file {excerpt(source)}; GET "
                       f"/v1/knowledge_bases/{name} lists its files", "not_found_error", "file", "file_not_found")
    try:
        _upload_path(kb, source).unlink(missing_ok=True)
    except APIError:
        pass  # a name that could not have been uploaded here (added by `glmkit kb add`)
    return {"object": "knowledge_base.file.deleted", "name": name, "file": source, "deleted": True}


@router.post("/v1/knowledge_bases/{name}/search", responses=error_responses(400, 404, 503))
async def search_knowledge_base(req: KnowledgeSearchRequest, request: Request, name: str = Name):
    k = knowledge_of(request.app.state.glmkit)
    hits = await _run(k.search, name, req.query, req.top_k, req.mode)
    return {"object": "list", "data": [h.citation() for h in hits]}


async def ground(state, client, name: str, messages: list[dict], max_tokens: int):
    """Retrieve for the last user message and put the passages that fit the context beside it. The answer's
    room is max_tokens but at most half the context, so a large max_tokens still leaves room for passages."""
    k = knowledge_of(state)
    room = client.max_model_len - min(max_tokens, client.max_model_len // 2)
    return await _run(k.ground, name, messages, room, param="knowledge_base")


def not_found(req, grounding):
    """The answer when nothing relevant was retrieved: a fixed sentence in the question's language."""
    text = grounding.not_found()
    request_id, created = sse.random_id("chatcmpl-"), sse.now()
    if not req.stream:
        return {"id": request_id, "object": "chat.completion", "created": created, "model": req.model,
                "system_fingerprint": "glmkit", "citations": [],
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": "stop"} for i in range(req.n)],
                "usage": sse.usage(0, 0, 0)}

    async def events():
        first = sse.chat_chunk(request_id, req.model, created, [
            {"index": i, "delta": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": None}
            for i in range(req.n)])
        yield sse.sse({**first, "citations": []})
        yield sse.sse(sse.chat_chunk(request_id, req.model, created, [
            {"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"} for i in range(req.n)]))
        if req.stream_options and req.stream_options.include_usage:
            yield sse.sse(sse.chat_chunk(request_id, req.model, created, [], sse.usage(0, 0, 0)))
        yield sse.DONE
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
