"""`glmkit serve`: the OpenAI-compatible API, the legacy ChatGLM `POST /` and embeddings, in one process."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import InvalidParameterError
from .args import add_model_arguments, engine_kwargs

log = logging.getLogger("glmkit")


def add_arguments(p) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", action="append", default=[], help="name(s) clients use (repeatable)")
    g.add_argument("--api-key", action="append", default=[], help="accepted bearer key (repeatable)")
    g.add_argument("--api-key-file", default=None, help="file with one accepted key per line")
    g.add_argument("--cors-origin", action="append", default=[], help="allowed CORS origin (repeatable; '*' for any)")
    g.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    g.add_argument("--embedding-model", default="default",
                   help="sentence-embedding model directory, 'default' (all-MiniLM-L6-v2) or 'none'")
    g.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together")


def api_keys(args) -> list[str]:
    keys = list(args.api_key)
    if args.api_key_file:
        try:
            keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise InvalidParameterError("--api-key-file", args.api_key_file, f"cannot be read ({e})")
    return keys


def main(args) -> int:
    import uvicorn

    from ..server.app import create_app
    from ..server.state import ServerSettings

    if args.max_queue < 1:
        raise InvalidParameterError("--max-queue", args.max_queue, "must be at least 1")
    settings = ServerSettings(
        model=args.model, served_model_names=args.served_model_name, api_keys=api_keys(args),
        cors_origins=args.cors_origin, max_queue=args.max_queue,
        embedding_model=None if args.embedding_model == "none" else args.embedding_model,
        engine_kwargs=engine_kwargs(args) | dict(max_num_seqs=args.max_num_seqs))
    log.info("glmkit serve: http://%s:%d (auth %s)", args.host, args.port, "on" if settings.api_keys else "off")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    return 0
