"""The web page's Knowledge mode: a panel to pick or create a knowledge base, add files to it, remove one, or
delete it; and the answers' backend, which asks the server to answer from the chosen knowledge base.

Everything goes through the server's HTTP API (/v1/knowledge_bases, and `knowledge_base` on
/v1/chat/completions), with the user's key, like the rest of the page: the page never reads a knowledge base's
folder itself. Each failure is one line for the panel's status (the server's own message: an unknown name
lists the ones there are; an unreadable pdf says why).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import gradio as gr

from ..backends import BackendError, error_fields
from .i18n import message, page_language

ROUTE = "/knowledge_bases"
ABSENT = (404, 405, 501)  # no such route (another server), or glmkit without the rag extra


class KnowledgeError(Exception):
    """A failed call, as one line; `status` as the server gave it."""

    def __init__(self, line: str, status: int | None = None):
        super().__init__(line)
        self.status = status


# --- the HTTP calls (backend: a ui.backends.RemoteBackend, for its client, key and API root) -------------------
def _call(backend, method: str, path: str, **kwargs) -> dict:
    import httpx

    try:
        r = backend.client.request(method, backend.base + ROUTE + path, **kwargs)
    except httpx.HTTPError as e:
        raise KnowledgeError(str(backend._connection_error(e))) from None
    if r.status_code >= 400:
        text, _ = error_fields(r.content)
        raise KnowledgeError(f"{text} ({r.status_code})", r.status_code)
    try:
        return r.json()
    except ValueError:
        raise KnowledgeError(f"{backend.base}{ROUTE}{path}: the answer is not JSON; is this a glmkit server?",
                             r.status_code) from None


def _name(text: str) -> str:
    return "/" + quote(text, safe="")


def available(backend) -> bool:
    """Whether the server has knowledge bases at all (vLLM or a glmkit without the rag extra has not; a server
    that answers any GET alike lists no knowledge_base objects)."""
    try:
        listed = _call(backend, "GET", "")
    except KnowledgeError as e:
        return e.status is not None and e.status >= 400 and e.status not in ABSENT  # e.g. 503: loading
    data = listed.get("data") if isinstance(listed, dict) else None
    return isinstance(data, list) and all(isinstance(kb, dict) and kb.get("object") == "knowledge_base"
                                          for kb in data)


def names(backend) -> list[str]:
    return [kb["name"] for kb in _call(backend, "GET", "")["data"]]


def files(backend, kb: str) -> list[dict]:
    return _call(backend, "GET", _name(kb))["data"]


def create(backend, kb: str) -> None:
    """Hybrid search when the server has an embedding model, keyword search when it has none (its choice)."""
    _call(backend, "POST", "", json={"name": kb})


def upload(backend, kb: str, path: str, source: str) -> dict:
    """Adds (or replaces) the file as `source`; the server reads it into passages."""
    return _call(backend, "PUT", f"{_name(kb)}/files/{quote(source, safe='/')}", content=Path(path).read_bytes())


def remove(backend, kb: str, source: str) -> None:
    _call(backend, "DELETE", f"{_name(kb)}/files/{quote(source, safe='/')}")


def delete(backend, kb: str) -> None:
    _call(backend, "DELETE", _name(kb))


# --- answers ---------------------------------------------------------------------------------------------------
class KnowledgeBackend:
    """One answer's backend: the shared RemoteBackend, each request carrying `knowledge_base`; the passages
    the server sends before the answer go to `on_citations`. Never closes the shared backend."""
    interruptible = True

    def __init__(self, backend, kb: str, on_citations):
        self.backend, self.kb, self.on_citations = backend, kb, on_citations
        self.name, self.max_model_len = backend.name, backend.max_model_len

    def count_tokens(self, messages: list[dict]) -> None:
        return None

    def stream(self, messages, settings, tools=None, tool_choice=None):
        chunks = self.backend.stream(messages, settings, tools, tool_choice, extra={"knowledge_base": self.kb})
        try:
            for chunk in chunks:
                if chunk.citations is not None:
                    self.on_citations(chunk.citations)
                yield chunk
        finally:
            chunks.close()  # a stopped answer closes the HTTP stream: the server aborts it

    def close(self) -> None:
        pass


# --- the panel -------------------------------------------------------------------------------------------------
class KnowledgePanel:
    """The panel's components and events. `backend(request)`: the user's RemoteBackend; `language(request)`:
    "en" or "zh" for the status lines."""

    def __init__(self, backend, language):
        self.backend, self.language = backend, language

    def build(self, ui, i18n) -> None:
        with gr.Accordion(i18n("knowledge"), visible=False, elem_id="knowledge") as ui.knowledge_box:
            with gr.Row(equal_height=True):
                ui.kb = gr.Dropdown(label=i18n("kb"), choices=[], value=None, elem_id="kb", scale=1)
                ui.knowledge_base = ui.kb  # an input of the answers (Ask.knowledge_base)
                ui.kb_name = gr.Textbox(label=i18n("kb_new"), placeholder=i18n("kb_new_placeholder"),
                                        elem_id="kb-name", scale=1, max_length=64, submit_btn=i18n("kb_create"))
            with gr.Row(equal_height=False):
                ui.kb_upload = gr.File(label=i18n("kb_upload"), file_count="multiple", elem_id="kb-upload",
                                       height=150, scale=1)
                with gr.Column(scale=1):
                    ui.kb_files = gr.Radio(label=i18n("kb_files"), choices=[], elem_id="kb-files")
                    with gr.Row():
                        ui.kb_remove = gr.Button(i18n("kb_remove"), elem_id="kb-remove", size="sm")
                        ui.kb_delete = gr.Button(i18n("kb_delete"), elem_id="kb-delete", size="sm", variant="stop")
                    with gr.Row(visible=False, elem_id="kb-confirm") as ui.kb_confirm:
                        ui.kb_delete_yes = gr.Button(i18n("kb_delete_yes"), elem_id="kb-delete-yes", size="sm",
                                                     variant="stop")
                        ui.kb_delete_no = gr.Button(i18n("kb_delete_no"), elem_id="kb-delete-no", size="sm")
            ui.kb_status = gr.Markdown(elem_id="kb-status")

    def wire(self, ui) -> None:
        listed = [ui.kb, ui.kb_files, ui.kb_status]
        ui.mode.change(lambda m: gr.Accordion(visible=m == "knowledge", open=True), ui.mode, ui.knowledge_box)
        ui.mode.change(self.refresh, [ui.mode, ui.kb], listed)
        ui.kb.change(self.choose, ui.kb, [ui.kb_files, ui.kb_status])
        ui.kb_name.submit(self.create, ui.kb_name, [ui.kb, ui.kb_name, ui.kb_status])
        ui.kb_upload.upload(self.upload, [ui.kb, ui.kb_upload], [ui.kb_files, ui.kb_status, ui.kb_upload])
        ui.kb_remove.click(self.remove, [ui.kb, ui.kb_files], [ui.kb_files, ui.kb_status])
        ui.kb_delete.click(self.ask_delete, ui.kb, [ui.kb_confirm, ui.kb_status])
        ui.kb_delete_no.click(lambda: gr.Row(visible=False), None, ui.kb_confirm)
        ui.kb_delete_yes.click(self.delete, ui.kb, [*listed, ui.kb_confirm])

    def _say(self, request, key: str, **values) -> str:
        return message(key, self.language(request), **values)

    def _files(self, request, kb: str | None):
        """The file list of `kb` (empty without one)."""
        rows = files(self.backend(request), kb) if kb else []
        return gr.Radio(choices=[(f"{f['source']} · {f['chunks']}", f["source"]) for f in rows], value=None)

    def choices(self, request, selected: str | None = None):
        """The knowledge bases, `selected` chosen when it is one of them."""
        listed = names(self.backend(request))
        return gr.Dropdown(choices=listed, value=selected if selected in listed else None)

    # --- events ----------------------------------------------------------------------------------------------
    def refresh(self, mode: str, kb: str | None, request: gr.Request):
        """On entering the mode: the knowledge bases as the server has them now (others may have changed them)."""
        if mode != "knowledge":
            return gr.skip(), gr.skip(), gr.skip()
        try:
            return self.choices(request, kb), self._files(request, kb), ""
        except (KnowledgeError, BackendError) as e:
            return gr.skip(), gr.skip(), _line(e)

    def choose(self, kb: str | None, request: gr.Request):
        try:
            return self._files(request, kb), ""
        except (KnowledgeError, BackendError) as e:
            return gr.Radio(choices=[], value=None), _line(e)

    def create(self, name: str, request: gr.Request):
        name = (name or "").strip()
        if not name:
            return gr.skip(), gr.skip(), self._say(request, "kb_no_name")
        try:
            create(self.backend(request), name)
            return self.choices(request, name), "", self._say(request, "kb_created", name=_md(name))
        except (KnowledgeError, BackendError) as e:
            return gr.skip(), gr.skip(), _line(e)

    def upload(self, kb: str | None, paths, request: gr.Request):
        """Each file in turn, under its own name: a line for each (its passages, or the server's refusal)."""
        if not kb:
            return gr.skip(), self._say(request, "kb_none"), None
        lines = []
        for path in [paths] if isinstance(paths, str) else paths or []:
            source = Path(path).name
            try:
                report = upload(self.backend(request), kb, path, source)
                key = "kb_added" if report.get("added") or report.get("updated") else "kb_unchanged"
                lines.append("✓ " + self._say(request, key, file=_md(source), chunks=report.get("chunks", 0)))
            except (KnowledgeError, BackendError, OSError) as e:
                lines.append("✗ " + (_line(e) if source in str(e) else f"{_md(source)}: {_line(e)}"))
        try:
            listed = self._files(request, kb)
        except (KnowledgeError, BackendError) as e:
            listed = gr.skip()
            lines.append("✗ " + _line(e))
        return listed, "  \n".join(lines), None

    def remove(self, kb: str | None, source: str | None, request: gr.Request):
        if not kb:
            return gr.skip(), self._say(request, "kb_none")
        if not source:
            return gr.skip(), self._say(request, "kb_no_file")
        try:
            remove(self.backend(request), kb, source)
            return self._files(request, kb), self._say(request, "kb_removed", file=_md(source))
        except (KnowledgeError, BackendError) as e:
            return gr.skip(), _line(e)

    def ask_delete(self, kb: str | None, request: gr.Request):
        """Deleting takes a second click (its files go too)."""
        if not kb:
            return gr.Row(visible=False), self._say(request, "kb_none")
        return gr.Row(visible=True), ""

    def delete(self, kb: str | None, request: gr.Request):
        hidden = gr.Row(visible=False)
        if not kb:
            return gr.skip(), gr.skip(), self._say(request, "kb_none"), hidden
        try:
            delete(self.backend(request), kb)
            return (self.choices(request), gr.Radio(choices=[], value=None),
                    self._say(request, "kb_deleted", name=_md(kb)), hidden)
        except (KnowledgeError, BackendError) as e:
            return gr.skip(), gr.skip(), _line(e), hidden


def _md(text: str) -> str:
    """A name shown as written in the Markdown status line."""
    return "".join("\\" + c if c in "\\`*_{}[]<>#|~" else c for c in str(text))


def _line(error: Exception) -> str:
    """An error as one line of the status."""
    return _md(" ".join(str(error).split()))


def language_of(fixed: str | None):
    """`language(request)` for the panel: `--language`, else the browser's."""
    return lambda request: page_language(fixed, (getattr(request, "headers", None) or {}).get("accept-language"))
