"""`glmkit serve`: the OpenAI-compatible API, the legacy ChatGLM `POST /` and embeddings, in one process.

The listening socket is bound before the model loads and handed to uvicorn: a port in use is one line at once
(not a uvicorn traceback after the load), and nothing can take the port while the model loads. SIGTERM or
Ctrl-C drains the server (server/lifecycle.py) instead of uvicorn's close-and-wait. Knows the command-line flags
and uvicorn; the routes live in server/.
"""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

from ..errors import InvalidParameterError
from ..ui.web import options as web_options
from .args import add_model_arguments, engine_kwargs, existing_path, integer, number, size

log = logging.getLogger("glmkit")


def _embedding_model(text: str) -> str:
    if text in ("default", "none"):
        return text
    return existing_path("--embedding-model", "pass a sentence-embedding model directory, 'default' or 'none'")(text)


def add_arguments(p) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    g.add_argument("--port", default=8000, help="TCP port (default 8000)",
                   type=integer("--port", 1, 65535, fix="e.g. --port 8000"))
    g.add_argument("--served-model-name", action="append", default=[], help="name(s) clients use (repeatable)")
    g.add_argument("--api-key", action="append", default=[], help="accepted bearer key (repeatable)")
    g.add_argument("--api-key-file", default=None, help="file with one accepted key per line",
                   type=existing_path("--api-key-file", "pass a file with one key per line"))
    g.add_argument("--cors-origin", action="append", default=[], help="allowed CORS origin (repeatable; '*' for any)")
    g.add_argument("--max-queue", default=256, help="sequences in flight (each prompt times n; an embeddings "
                   "request counts one per 32 texts) before answering 429 (default 256)",
                   type=integer("--max-queue", 1, fix="e.g. --max-queue 256"))
    g.add_argument("--max-queue-tokens", default=None, metavar="N", help="tokens of work in flight (prompt + "
                   "max_tokens of every sequence) before answering 429; a request alone above it gets a 400 "
                   "(default: four times what the KV cache holds)",
                   type=integer("--max-queue-tokens", 1, fix="e.g. --max-queue-tokens 1000000"))
    g.add_argument("--embedding-model", default="default", type=_embedding_model,
                   help="sentence-embedding model directory, 'default' (all-MiniLM-L6-v2) or 'none'")
    g.add_argument("--kb-dir", default=None, metavar="DIR", help="knowledge bases' folder, as `glmkit kb` "
                   "uses it (default $GLMKIT_HOME/kb, else ~/.local/share/glmkit/kb)")
    g.add_argument("--reranker", default=None, metavar="PATH", help="a local cross-encoder folder (e.g. "
                   "bge-reranker-base) that orders the passages `knowledge_base` retrieves",
                   type=existing_path("--reranker", "pass a local sentence-transformers CrossEncoder folder"))
    g.add_argument("--default-max-tokens", default=4096, type=integer("--default-max-tokens", 0, fix="0 lets an "
                   "answer run until the context is full"), help="answer length for chat requests that set no "
                   "max_tokens, so a model stuck in a loop cannot hold a slot for the whole context (default 4096; "
                   "0: until the context is full)")
    g.add_argument("--max-num-seqs", default=64, help="requests decoded together (default 64)",
                   type=integer("--max-num-seqs", 1, fix="e.g. --max-num-seqs 64"))
    g.add_argument("--shutdown-timeout", default=30.0, type=number("--shutdown-timeout", 0, fix="e.g. "
                   "--shutdown-timeout 30"), help="on SIGTERM or Ctrl-C, seconds running requests may take to "
                   "finish before they are aborted (default 30; new requests get 503 meanwhile)")
    g.add_argument("--engine-stall-timeout", default=120.0, type=number("--engine-stall-timeout", 0, low_open=True,
                   fix="e.g. --engine-stall-timeout 120"), help="GET /health answers 503 when one engine step "
                   "runs longer than this many seconds (default 120)")
    limits = p.add_argument_group("limits (one client must not stall the others)")
    limits.add_argument("--max-body-size", default="8M", type=size("--max-body-size", 1024, fix="e.g. "
                        "--max-body-size 16M"), help="largest request body; more is a 413 (default 8M)")
    limits.add_argument("--read-timeout", default=30.0, type=number("--read-timeout", 0, low_open=True,
                        fix="e.g. --read-timeout 30"), help="seconds a client has to send a request's headers, "
                        "and then its body; slower is a 408 (default 30)")
    limits.add_argument("--max-connections", default=1024, type=integer("--max-connections", 1, fix="e.g. "
                        "--max-connections 1024"), help="open connections; more are answered 503 (default 1024)")
    limits.add_argument("--request-timeout", default=0.0, type=number("--request-timeout", 0, fix="e.g. "
                        "--request-timeout 300"), help="seconds a generation request may run, from its arrival; "
                        "then it is aborted with a 408 or a final stream error event (default 0: no limit)")
    g.add_argument("--open-docs", action="store_true", help="serve /docs, /redoc and /openapi.json without the "
                   "API key (with a key set they need it by default)")
    g.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="do not log one line per request (the glmkit.access logger)")
    web_options.add_arguments(p, serve=True)


def api_keys(args) -> list[str]:
    keys = list(args.api_key)
    if args.api_key_file:
        try:
            keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidParameterError("--api-key-file", args.api_key_file, f"cannot be read ({e})")
    return keys


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening), or an error that says which flag to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InvalidParameterError("--host", host, f"cannot be resolved ({e.strerror}); use an address of this "
                                    "machine, e.g. --host 127.0.0.1 or --host 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a port left in TIME_WAIT by a server that just stopped is free to reuse.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        other = port + 1 if port < 65535 else 8000
        if e.errno == errno.EADDRINUSE:
            message = f"{host}:{port} is already in use; stop the other server or pick another port, e.g. " \
                      f"--port {other}"
        elif e.errno == errno.EACCES:
            message = f"binding {host}:{port} is not permitted (ports below 1024 need administrator rights); " \
                      f"pick another port, e.g. --port 8000"
        elif e.errno == errno.EADDRNOTAVAIL:
            raise InvalidParameterError("--host", host, "is not an address of this machine; use e.g. --host "
                                        "127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)") from None
        else:
            message = f"cannot listen on {host}:{port} ({e.strerror}); pick another port, e.g. --port {other}"
        raise InvalidParameterError("--port", port, message) from None
    return sock


def main(args) -> int:
    if args.ui:
        web_options.check(args)
    sock = bind(args.host, args.port)  # first: before minutes of loading
    import uvicorn

    from ..server.app import create_app
    from ..server.connections import guarded_protocol
    from ..server.lifecycle import GlmkitServer
    from ..server.limits import Limits
    from ..server.state import ServerSettings

    settings = ServerSettings(
        model=args.model, served_model_names=args.served_model_name, api_keys=api_keys(args),
        cors_origins=args.cors_origin, max_queue=args.max_queue, max_queue_tokens=args.max_queue_tokens,
        default_max_tokens=args.default_max_tokens or None,
        embedding_model=None if args.embedding_model == "none" else args.embedding_model,
        engine_kwargs=engine_kwargs(args) | dict(max_num_seqs=args.max_num_seqs), open_docs=args.open_docs,
        access_log=args.access_log, engine_stall_s=args.engine_stall_timeout, kb_dir=args.kb_dir,
        reranker=args.reranker,
        limits=Limits(max_body_bytes=args.max_body_size, read_timeout_s=args.read_timeout,
                      max_connections=args.max_connections, request_timeout_s=args.request_timeout or None))
    log.info("glmkit serve: http://%s:%d (auth %s)", args.host, args.port, "on" if settings.api_keys else "off")
    app = create_app(settings)
    closing = mount_page(app, settings, args) if args.ui else []
    # Our drain runs first (GlmkitServer); uvicorn's graceful timeout only bounds the final close after it.
    # Our HTTP/1.1 protocol adds a header deadline and a connection cap to uvicorn's (server/connections.py).
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            http=guarded_protocol(settings.limits))
    server = GlmkitServer(config, app.state.glmkit, args.shutdown_timeout)
    try:
        with sock:
            server.run(sockets=[sock])
    finally:
        for thing in reversed(closing):
            thing.close()
    if not server.started:  # uvicorn logged why (e.g. the app's start-up failed)
        return 1
    return server.exit_code


def mount_page(app, settings, args) -> list:
    """The web page at /ui, calling this server over the loopback with each user's key; what to close after."""
    if not web_options.available():
        log.warning("glmkit: no web page at /ui: it needs the web extra (pip install 'glmkit[web]'); serving the "
                    "API only")
        return []
    import hmac

    from ..ui.web.app import mount

    keys = settings.api_keys

    def check_key(key: str) -> bool:
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)

    loopback = "[::1]" if ":" in args.host else "127.0.0.1"
    config, closing = web_options.web_config(args, f"http://{loopback}:{args.port}/v1",
                                             check_key=check_key if keys else None)
    settings.ui_path = "/ui"
    mount(app, config, settings.ui_path)
    log.info("glmkit serve: the web page at http://%s:%d/ui", args.host, args.port)
    return closing
