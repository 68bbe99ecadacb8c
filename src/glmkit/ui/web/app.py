"""The web chat page (Gradio Blocks): Chat, Tools, Code Interpreter, Character and Knowledge modes over one HTTP
API.

The page is a client of an OpenAI-compatible server (`ui/backends.RemoteBackend`), nothing more: mounted in
`glmkit serve` it calls its own server over the loopback; `glmkit web --url` points it at any server. Each
answer runs through the agent loop (tools/agent.py) with the mode's tools: none, the configured tools, or the
conversation's own Python kernel (a KernelPool keyed by conversation id). Knowledge mode answers from a
knowledge base of the user's documents (knowledge.py: its panel, and the request's `knowledge_base`), the cited
passages kept with the answer. Conversations are kept per user in
SQLite (store.py) and listed in the sidebar. With API keys, the page asks for one at login (the password; the
user name is only a label): each key sees its own conversations and kernels, and its requests carry that key.

Stop asks the running turn's agent to cancel: the HTTP stream closes (the server aborts the request and frees
its KV blocks) and a running cell is interrupted; the partial answer is kept and marked. Many users at once:
the queue has no concurrency limit, so their requests meet in the server's batch.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import gradio as gr

from ...chat.messages import persona_system_prompt
from ...tools.agent import Agent, TextDelta
from ..backends import BackendError, RemoteBackend
from . import knowledge
from .i18n import message, translations
from .store import ConversationStore, export_json, export_markdown
from .turns import Turn, api_messages, display

log = logging.getLogger("glmkit")

MODES = ("chat", "tools", "code", "character", "knowledge")
TOOL_MODES = ("tools", "code")
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]
DEFAULTS = {"max_tokens": 1024, "temperature": 0.95, "top_p": 0.8}  # the ChatGLM3 composite demo's sampling
LOCAL_OWNER = "local"
UPDATES_PER_S = 20  # page updates while an answer streams
MAX_BACKENDS = 64  # HTTP clients kept, one per (key, model, character profile)


@dataclass
class Ask:
    """What an answer event gets from the page: the message box, the conversation, and the settings."""
    text: str
    conversation_id: str
    model: str | None
    mode: str
    system: str
    max_tokens: float
    temperature: float
    top_p: float
    bot_name: str
    bot_info: str
    user_name: str
    user_info: str
    greeting: str
    knowledge_base: str | None = None  # Knowledge mode's knowledge base

    def character(self) -> dict:
        """The CharacterGLM profile (defaults where a field is empty), with the greeting if there is one."""
        bot_name, bot_info, user_name, user_info, greeting = (str(v or "").strip() for v in (
            self.bot_name, self.bot_info, self.user_name, self.user_info, self.greeting))
        return {"bot_name": bot_name or "角色", "bot_info": bot_info or "一个友好的角色",
                "user_name": user_name or "用户", "user_info": user_info, **({"greeting": greeting} if greeting else {})}


ASK = [f.name for f in fields(Ask)]
PROFILE = ASK[ASK.index("bot_name"):ASK.index("greeting") + 1]  # bot_name, bot_info, user_name, user_info, greeting


@dataclass
class WebConfig:
    url: str                                   # the API root, e.g. http://127.0.0.1:8000/v1
    store: ConversationStore
    api_key: str | None = None                 # the key the page sends when users do not log in
    check_key: Callable[[str], bool] | None = None  # with API keys: is this login's key accepted?
    tools: list = field(default_factory=list)  # the Tools mode's tools (glmkit.tools.Tool)
    kernels: object | None = None              # a tools.kernel.KernelPool for the Code Interpreter mode
    max_rounds: int = 5
    language: str | None = None                # "en" / "zh": fixed labels; None: the browser's language
    glmkit_server: bool = True                 # the far side takes glmkit's `character` field


class WebApp:
    def __init__(self, config: WebConfig):
        self.config = config
        self._keys: dict[str, str] = {}          # login name -> its key (this process's logins)
        self._running: dict[str, object] = {}    # browser session -> the agent answering it
        self.tools_refused = False               # the server answered a request with tools with a refusal
        self._backends: dict[tuple, RemoteBackend] = {}
        self._lock = threading.Lock()
        self.language = knowledge.language_of(config.language)  # request -> "en" / "zh" for run-time lines
        self.knowledge = knowledge.KnowledgePanel(lambda request: self._backend(request, None), self.language)

    # --- users -----------------------------------------------------------------------------------------------
    def login(self, username: str, password: str) -> bool:
        """Gradio's auth: the password is an API key the server accepts; a name stays bound to its key."""
        if self.config.check_key is None or not self.config.check_key(password):
            return False
        with self._lock:
            bound = self._keys.setdefault(username, password)
        return hmac.compare_digest(bound.encode(), password.encode())

    def _key(self, request: gr.Request | None) -> str | None:
        if self.config.check_key is None:
            return self.config.api_key
        return self._keys.get(getattr(request, "username", None) or "")

    def _owner(self, request: gr.Request | None) -> str:
        key = self._key(request)
        if self.config.check_key is None or key is None:
            return LOCAL_OWNER
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    def _backend(self, request, model: str | None, character: dict | None = None) -> RemoteBackend:
        key = self._key(request)
        cache_key = (key, model, repr(sorted(character.items())) if character else None)
        with self._lock:
            backend = self._backends.get(cache_key)
        if backend is None:
            backend = RemoteBackend(self.config.url, api_key=key, model=model or None, character=character)
            with self._lock:
                if len(self._backends) >= MAX_BACKENDS:  # the oldest goes (a turn using it keeps its reference)
                    self._backends.pop(next(iter(self._backends)))
                backend = self._backends.setdefault(cache_key, backend)
        return backend

    # --- page events -----------------------------------------------------------------------------------------
    def on_load(self, request: gr.Request):
        """The models, the modes the server can run, the sidebar, and the most recent conversation opened (see
        `open` for the rest)."""
        models = self.models(request)
        rows = self.config.store.list(self._owner(request))
        modes = [m for m in MODES if not (self.tools_refused and m in TOOL_MODES)]
        if not self._has_knowledge(request):
            modes.remove("knowledge")
        opened = list(self.open(rows[0].id if rows else "", request))
        opened[4] = gr.Radio(choices=[(self.i18n(f"mode_{m}"), m) for m in modes],
                             value=opened[4] if opened[4] in modes else "chat")
        return (gr.Dropdown(choices=models, value=models[0] if models else None), *opened)

    def _has_knowledge(self, request) -> bool:
        """Whether the server keeps knowledge bases (another server, or glmkit without the rag extra, does not)."""
        try:
            return knowledge.available(self._backend(request, None))
        except BackendError:
            return True  # unreachable now: the mode says so when used

    def models(self, request) -> list[str]:
        try:
            backend = self._backend(request, None)
            r = backend.client.get(backend.base + "/models")
            return [m["id"] for m in r.json().get("data", [])] if r.status_code == 200 else []
        except (BackendError, ValueError, OSError):
            return []

    def _sidebar(self, request, current: str):
        rows = self.config.store.list(self._owner(request))
        return gr.Radio(choices=[(row.title or "…", row.id) for row in rows], value=current or None)

    def open(self, conversation_id: str, request: gr.Request):
        """(sidebar, conversation id, chatbot, stats, mode, system, title, the five character fields, the
        knowledge base): the conversation as it was left."""
        if not conversation_id:
            return self._sidebar(request, ""), "", [], "", "chat", "", "", *[""] * len(PROFILE), gr.skip()
        conversation = self.config.store.get(self._owner(request), conversation_id)
        settings = conversation.settings
        last = next((m for m in reversed(conversation.messages) if m.get("glmkit", {}).get("line")), None)
        character = settings.get("character") or {}
        return (self._sidebar(request, conversation_id), conversation_id, display(conversation.messages).messages,
                last["glmkit"]["line"] if last else "", conversation.mode, settings.get("system", ""),
                conversation.title, *[character.get(name, "") for name in PROFILE],
                self._opened_knowledge_base(request, settings.get("knowledge_base")))

    def _opened_knowledge_base(self, request, kb: str | None):
        """A Knowledge conversation's knowledge base chosen again (if it still exists)."""
        if not kb:
            return gr.skip()
        try:
            return self.knowledge.choices(request, kb)
        except (knowledge.KnowledgeError, BackendError):
            return gr.skip()

    def new(self, request: gr.Request):
        return "", [], "", self._sidebar(request, ""), ""

    def rename(self, conversation_id: str, title: str, request: gr.Request):
        if conversation_id:
            self.config.store.rename(self._owner(request), conversation_id, title)
        return self._sidebar(request, conversation_id)

    def delete(self, conversation_id: str, request: gr.Request):
        if conversation_id:
            self.config.store.delete(self._owner(request), conversation_id)
            if self.config.kernels is not None:
                self.config.kernels.close_session(conversation_id)
        return self.new(request)

    def _export(self, conversation_id: str, kind: str, request: gr.Request):
        if not conversation_id:
            return gr.File(value=None, visible=False)
        conversation = self.config.store.get(self._owner(request), conversation_id)
        folder = self.config.store.image_dir(conversation_id)
        path = folder / f"conversation.{'json' if kind == 'json' else 'md'}"
        path.write_text(export_json(conversation) if kind == "json" else export_markdown(conversation),
                        encoding="utf-8")
        return gr.File(value=str(path), visible=True)

    def stop(self, request: gr.Request):
        agent = self._running.get(request.session_hash)
        if agent is not None:
            agent.cancel()

    # --- answers ---------------------------------------------------------------------------------------------
    # The three answer events take the same inputs, in ASK order (also the order of the page's /send API).
    def send(self, text, conversation_id, model, mode, system, max_tokens, temperature, top_p, bot_name, bot_info,
             user_name, user_info, greeting, knowledge_base, request: gr.Request):
        ask = Ask(text, conversation_id, model, mode, system, max_tokens, temperature, top_p, bot_name, bot_info,
                  user_name, user_info, greeting, knowledge_base)
        if not text.strip():
            yield gr.skip(), gr.skip(), conversation_id, gr.skip(), text
            return
        yield from self._answer(request, ask, lambda messages: messages + [{"role": "user", "content": text}],
                                clear_input=True)

    def retry(self, text, conversation_id, model, mode, system, max_tokens, temperature, top_p, bot_name, bot_info,
              user_name, user_info, greeting, knowledge_base, data: gr.RetryData, request: gr.Request):
        ask = Ask(text, conversation_id, model, mode, system, max_tokens, temperature, top_p, bot_name, bot_info,
                  user_name, user_info, greeting, knowledge_base)
        k = self._user_index(request, conversation_id, data.index)
        yield from self._answer(request, ask, lambda messages: messages[:k + 1])

    def edit(self, text, conversation_id, model, mode, system, max_tokens, temperature, top_p, bot_name, bot_info,
             user_name, user_info, greeting, knowledge_base, data: gr.EditData, request: gr.Request):
        ask = Ask(text, conversation_id, model, mode, system, max_tokens, temperature, top_p, bot_name, bot_info,
                  user_name, user_info, greeting, knowledge_base)
        k = self._user_index(request, conversation_id, data.index)
        value = data.value if isinstance(data.value, str) else str(data.value)
        yield from self._answer(request, ask, lambda messages: messages[:k] + [{"role": "user", "content": value}])

    def undo(self, conversation_id: str, data: gr.UndoData, request: gr.Request):
        """The user message and what followed it are removed; its text goes back to the input box."""
        owner = self._owner(request)
        conversation = self.config.store.get(owner, conversation_id)
        k = self._user_index(request, conversation_id, data.index)
        text = conversation.messages[k]["content"]
        conversation = self.config.store.save(owner, conversation_id, conversation.messages[:k])
        return display(conversation.messages).messages, text if isinstance(text, str) else ""

    def _user_index(self, request, conversation_id: str, shown_index) -> int:
        conversation = self.config.store.get(self._owner(request), conversation_id)
        index = shown_index[0] if isinstance(shown_index, (list, tuple)) else shown_index
        return display(conversation.messages).sources[int(index)]

    def _answer(self, request, ask: Ask, change, clear_input: bool = False):
        """Stream one answer into the page: (chatbot, stats, conversation id, sidebar, input box) at each step."""
        store, owner = self.config.store, self._owner(request)
        mode, system, model, conversation_id = ask.mode, (ask.system or "").strip(), ask.model, ask.conversation_id
        kb = ask.knowledge_base if mode == "knowledge" else None
        if mode == "knowledge" and not kb:  # nothing to answer from: say so, keep the message
            line = message("kb_none", self.language(request))
            gr.Warning(line)
            yield gr.skip(), line, conversation_id, gr.skip(), gr.skip()
            return
        new = not conversation_id
        conversation = store.create(owner, mode) if new else store.get(owner, conversation_id)
        conversation_id = conversation.id
        messages = change(conversation.messages)
        character = ask.character() if mode == "character" else None
        if character and not conversation.messages and character.get("greeting"):
            messages = [{"role": "assistant", "content": character["greeting"]}] + messages
        sent = messages
        if character and not self.config.glmkit_server:
            sent = [{"role": "system", "content": persona_system_prompt(character)}] + messages
        elif system and mode != "character":
            sent = [{"role": "system", "content": system}] + messages
        turn = Turn(messages, lambda png: store.save_image(owner, conversation_id, png))
        yield (turn.shown(), "", conversation_id, self._sidebar(request, conversation_id) if new else gr.skip(),
               "" if clear_input else gr.skip())
        settings = {"max_tokens": int(ask.max_tokens), "temperature": float(ask.temperature),
                    "top_p": float(ask.top_p)}
        agent = self._agent(request, model, mode, conversation_id, character, settings)
        if kb:
            agent.backend = knowledge.KnowledgeBackend(agent.backend, kb, turn.cite)
        self._running[request.session_hash] = agent
        try:
            events = agent.run(api_messages(sent))
            try:
                shown_at = 0.0
                for event in events:
                    turn.feed(event)
                    # Text at most UPDATES_PER_S times a second (each update re-sends the conversation to the
                    # browser); tool steps at once
                    if not isinstance(event, TextDelta) or time.monotonic() - shown_at >= 1 / UPDATES_PER_S:
                        shown_at = time.monotonic()
                        yield turn.shown(), turn.figures.line(), conversation_id, gr.skip(), gr.skip()
            finally:
                events.close()
            if turn.error and mode in TOOL_MODES and refuses_tools(turn.error):
                self.tools_refused = True  # hidden from now on: a server without tool calling cannot run them
                turn.error += " (this server does not take tools: the Tools and Code Interpreter modes are hidden)"
            if turn.error:
                gr.Warning(turn.error)
        finally:
            self._running.pop(request.session_hash, None)
            kept = {"system": system, "model": model, **({"character": character} if character else {}),
                    **({"knowledge_base": kb} if kb else {})}
            store.save(owner, conversation_id, turn.messages, mode=mode, settings=kept)
        stats = turn.figures.line() or (f"error: {turn.error}" if turn.error else "")
        yield turn.shown(), stats, conversation_id, self._sidebar(request, conversation_id), gr.skip()

    def _agent(self, request, model, mode, conversation_id, character, settings):
        """An agent for this turn (its backend is shared between turns: the agent is never closed)."""
        profile = ({k: v for k, v in character.items() if k != "greeting"}
                   if character and self.config.glmkit_server else None)
        tools = []
        if mode == "tools":
            tools = list(self.config.tools)
        elif mode == "code" and self.config.kernels is not None:
            from ...tools.kernel import python_tool

            tools = [python_tool(self.config.kernels, conversation_id)]
        return Agent(self._backend(request, model, profile), tools, max_rounds=self.config.max_rounds,
                     settings=settings)

    def export_json(self, conversation_id: str, request: gr.Request):
        return self._export(conversation_id, "json", request)

    def export_markdown(self, conversation_id: str, request: gr.Request):
        return self._export(conversation_id, "md", request)

    # --- the page --------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        i18n = self.i18n = gr.I18n(**translations(self.config.language))
        with gr.Blocks(title="glmkit", fill_height=True) as page:
            ui = self.ui = _Components()
            ui.conversation_id = gr.State("")
            with gr.Sidebar(open=True):
                ui.new = gr.Button(i18n("new"), elem_id="new")
                ui.conversations = gr.Radio(label=i18n("conversations"), choices=[], elem_id="conversations")
                ui.title = gr.Textbox(label=i18n("title"), elem_id="title", max_length=200)
                with gr.Row():
                    ui.rename = gr.Button(i18n("rename"), elem_id="rename", size="sm")
                    ui.delete = gr.Button(i18n("delete"), elem_id="delete", size="sm", variant="stop")
                with gr.Row():
                    ui.export_json = gr.Button(i18n("export_json"), elem_id="export-json", size="sm")
                    ui.export_md = gr.Button(i18n("export_md"), elem_id="export-md", size="sm")
                ui.exported = gr.File(label=i18n("export"), elem_id="exported", interactive=False, visible=False)
            with gr.Row(equal_height=False):
                with gr.Column(scale=4):
                    self._chat_column(ui, i18n)
                with gr.Column(scale=1, min_width=240):
                    ui.model = gr.Dropdown(label=i18n("model"), choices=[], elem_id="model", allow_custom_value=True)
                    ui.system = gr.Textbox(label=i18n("system"), lines=3, elem_id="system")
                    ui.max_tokens = gr.Slider(1, 32000, value=DEFAULTS["max_tokens"], step=1,
                                              label=i18n("max_tokens"), elem_id="max-tokens")
                    ui.temperature = gr.Slider(0.0, 1.5, value=DEFAULTS["temperature"], step=0.01,
                                               label=i18n("temperature"), elem_id="temperature")
                    ui.top_p = gr.Slider(0.0, 1.0, value=DEFAULTS["top_p"], step=0.01, label=i18n("top_p"),
                                         elem_id="top-p")
            self._wire(ui, page)
        page.queue(default_concurrency_limit=None)
        return page

    def _chat_column(self, ui, i18n) -> None:
        ui.mode = gr.Radio([(i18n(f"mode_{m}"), m) for m in MODES], value="chat", label=i18n("mode"), elem_id="mode")
        with gr.Accordion(i18n("character"), visible=False, elem_id="character") as ui.character_box:
            with gr.Row():
                ui.bot_name = gr.Textbox(label=i18n("bot_name"), elem_id="bot-name")
                ui.user_name = gr.Textbox(label=i18n("user_name"), elem_id="user-name")
            ui.bot_info = gr.Textbox(label=i18n("bot_info"), lines=2, elem_id="bot-info")
            ui.user_info = gr.Textbox(label=i18n("user_info"), lines=1, elem_id="user-info")
            ui.greeting = gr.Textbox(label=i18n("greeting"), elem_id="greeting")
        self.knowledge.build(ui, i18n)
        ui.chatbot = gr.Chatbot(elem_id="chat", editable="user", latex_delimiters=LATEX, height="62vh",
                                buttons=["copy", "copy_all"], feedback_options=None, show_label=False)
        ui.stats = gr.Markdown(elem_id="stats")
        with gr.Row():
            ui.text = gr.Textbox(show_label=False, placeholder=i18n("placeholder"), elem_id="message", scale=8,
                                 lines=1, max_lines=12, autofocus=True)
            ui.send = gr.Button(i18n("send"), elem_id="send", variant="primary", scale=1, min_width=80)
            ui.stop = gr.Button(i18n("stop"), elem_id="stop", variant="stop", scale=1, min_width=80)

    def _wire(self, ui, page) -> None:
        values = [getattr(ui, name) for name in ASK]
        answer = [ui.chatbot, ui.stats, ui.conversation_id, ui.conversations, ui.text]
        ui.text.submit(self.send, values, answer)
        ui.send.click(self.send, values, answer)
        ui.stop.click(self.stop, None, None, queue=False)
        ui.chatbot.retry(self.retry, values, answer)
        ui.chatbot.edit(self.edit, values, answer)
        ui.chatbot.undo(self.undo, ui.conversation_id, [ui.chatbot, ui.text])
        ui.chatbot.clear(self.new, None, [ui.conversation_id, ui.chatbot, ui.stats, ui.conversations, ui.title])
        ui.mode.change(lambda m: gr.Accordion(visible=m == "character", open=True), ui.mode, ui.character_box)
        self.knowledge.wire(ui)
        opened = [ui.conversations, ui.conversation_id, ui.chatbot, ui.stats, ui.mode, ui.system, ui.title,
                  *[getattr(ui, name) for name in PROFILE], ui.kb]
        ui.conversations.input(self.open, ui.conversations, opened)
        cleared = [ui.conversation_id, ui.chatbot, ui.stats, ui.conversations, ui.title]
        ui.new.click(self.new, None, cleared)
        ui.rename.click(self.rename, [ui.conversation_id, ui.title], ui.conversations)
        ui.delete.click(self.delete, ui.conversation_id, cleared)
        ui.export_json.click(self.export_json, ui.conversation_id, ui.exported)
        ui.export_md.click(self.export_markdown, ui.conversation_id, ui.exported)
        page.load(self.on_load, None, [ui.model, *opened])


def refuses_tools(error: str) -> bool:
    """A 400 that names tools (vLLM without --enable-auto-tool-choice, servers without tool calling)."""
    return " 400" in error and "tool" in error.lower()


class _Components:
    """The page's components, by name (set in WebApp.build)."""


def page_options(web: WebApp) -> dict:
    """What both mount_gradio_app and launch need besides the page: login, languages, servable folders."""
    return {"auth": web.login if web.config.check_key is not None else None, "i18n": web.i18n,
            "allowed_paths": [str(web.config.store.path.parent / "web-images")], "footer_links": ["settings"],
            "auth_message": "API key as the password (the name is yours to choose) · 以 API key 作密码"}


def mount(app, config: WebConfig, path: str = "/ui"):
    """The page inside a FastAPI app (glmkit serve) at `path`."""
    web = WebApp(config)
    page = web.build()
    return gr.mount_gradio_app(app, page, path=path, **page_options(web))
