"""`glmkit web`: the web chat page alone, as a client of any OpenAI-compatible server (glmkit, vLLM, Ollama).

With `--api-key` every visitor's requests carry that key. Without one, a server that refuses keyless requests
makes the page ask each visitor for their own key at login (checked against the server), and each key sees
only its own conversations. Knows the flags; the page lives in ui/web/.
"""

from __future__ import annotations

import logging

from ..errors import GlmkitError, InvalidParameterError
from ..ui.web import options
from .args import integer

log = logging.getLogger("glmkit")


def add_arguments(p) -> None:
    g = p.add_argument_group("server to chat with")
    g.add_argument("--url", default="http://127.0.0.1:8000/v1",
                   help="the OpenAI-compatible API root (default http://127.0.0.1:8000/v1)")
    g.add_argument("--api-key", default=None, help="the key the page sends for every visitor (default: each "
                   "visitor logs in with their own key when the server needs one)")
    g.add_argument("--host", default="127.0.0.1", help="address the page listens on (0.0.0.0 for every interface)")
    g.add_argument("--port", default=7860, type=integer("--port", 1, 65535, fix="e.g. --port 7860"),
                   help="the page's TCP port (default 7860)")
    options.add_arguments(p, serve=False)


def main(args) -> int:
    if not options.available():
        raise GlmkitError("glmkit web needs the web extra (Gradio): pip install 'glmkit[web]'")
    options.check(args)
    from ..ui.backends import BackendError, RemoteBackend, api_base

    url = api_base(args.url)
    needs_key, glmkit_server = _probe(url, args.api_key)

    def accepted(key: str) -> bool:
        """A login's key, as the server judges it."""
        try:
            RemoteBackend(url, api_key=key).close()
            return True
        except BackendError:
            return False

    check_key = accepted if needs_key and args.api_key is None else None
    from ..ui.web.app import WebApp, page_options

    config, closing = options.web_config(args, url, api_key=args.api_key, check_key=check_key,
                                         glmkit_server=glmkit_server)
    try:
        web = WebApp(config)
        page = web.build()
        log.info("glmkit web: http://%s:%d/ (chatting with %s; login %s)", args.host, args.port, url,
                 "on" if check_key else "off")
        page.launch(server_name=args.host, server_port=args.port, show_error=True, quiet=True, **page_options(web))
    finally:
        for thing in reversed(closing):
            thing.close()
    return 0


def _probe(url: str, api_key: str | None) -> tuple[bool, bool]:
    """(the server refuses requests without a key, the server is glmkit) from GET /models."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url + "/models", headers=headers, timeout=10)
    except httpx.HTTPError as e:
        raise GlmkitError(f"cannot reach {url} ({type(e).__name__}: {e}); is the server running? check --url") from None
    if r.status_code == 401 and api_key:
        raise InvalidParameterError("--api-key", "…", f"is refused by {url} (401)")
    try:
        owned = {m.get("owned_by") for m in r.json().get("data", [])} if r.status_code == 200 else set()
    except (ValueError, AttributeError):
        owned = set()
    # Behind a key the listing is hidden: the page then treats the server as any server (persona as a prompt)
    return r.status_code == 401, "glmkit" in owned
