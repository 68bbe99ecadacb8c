"""`glmkit chat`: a streaming multi-turn chat in the terminal, with a model loaded here or a server (`--url`).

Interactive (stdin is a terminal): line editing and history (ui/prompt.py), slash commands (ui/slash.py), a
spinner and colour (ui/console.py); `exit`, `stop` and `clear` typed alone work as in the ChatGLM demos.
Over a pipe: the whole of stdin is one message (`--line-mode`: one per line), nothing is a command, and only
the answers are printed on stdout (notices go to stderr).

This module wires flags to a backend (ui/backends.py) and a ChatSession (ui/session.py) and runs the loops;
it knows nothing of HTTP, the engine or prompt_toolkit's internals.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..commands.args import add_model_arguments, add_sampling_arguments, load_llm
from ..errors import InvalidParameterError
from ..tools import setup as tool_setup
from .console import BOLD_GREEN, Console
from .conversation import Conversation, setting_problem, settings_from_args
from .session import ChatSession

WELCOME = ("Chatting with {name}. /help lists the commands; Ctrl-C stops an answer; /bye or Ctrl-D quits.\n"
           "欢迎使用 {name}，输入内容即可对话，/help 查看命令，"
           "/clear 清空对话历史，/bye 退出")
DEMO_QUIT_WORDS = ("stop", "exit")  # the ChatGLM demos' words, typed alone
INTERRUPTED = 130  # the shell's code for a run ended by Ctrl-C


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, temperature=0.8, top_p=0.8, max_tokens=1024)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--character", default=None, metavar="PROFILE.json",
                   help="CharacterGLM profile: bot_name, bot_info, user_name, user_info (+ optional greeting)")
    p.add_argument("--stats", action="store_true", help="print time to first token and tokens/s after each answer")
    g = p.add_argument_group("terminal")
    g.add_argument("--url", default=None, help="chat with an OpenAI-compatible server instead of loading a model, "
                   "e.g. http://127.0.0.1:8000/v1 (glmkit serve, vLLM, Ollama); --model then names the server's "
                   "model (default: the first it lists)")
    g.add_argument("--api-key", default=None, help="bearer key for --url")
    g.add_argument("--line-mode", action="store_true",
                   help="piped input: each line is one message (default: the whole of stdin is one message)")
    g.add_argument("--no-history", action="store_true",
                   help="do not read or write the input history file ($GLMKIT_HOME/chat_history or "
                   "~/.config/glmkit/chat_history)")
    k = p.add_argument_group("knowledge base")
    k.add_argument("--kb", default=None, metavar="NAME", help="answer from this knowledge base's documents "
                   "(glmkit kb create), citing them; with tools on, the model searches it as a tool instead")
    k.add_argument("--kb-dir", default=None, metavar="DIR", help="where knowledge bases live (default "
                   "$GLMKIT_HOME/kb, else ~/.local/share/glmkit/kb)")
    k.add_argument("--reranker", default=None, metavar="PATH", help="a local cross-encoder folder (e.g. "
                   "bge-reranker-base) that orders the passages --kb retrieves")
    tool_setup.add_arguments(p)


def load_character(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        profile = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidParameterError("--character", path, f"cannot be read as a JSON profile ({e})")
    if not isinstance(profile, dict) or not profile.get("bot_name") or not profile.get("bot_info"):
        raise InvalidParameterError("--character", path, "needs non-empty bot_name and bot_info fields")
    return profile


def checked_settings(args) -> dict:
    """The sampling flags as the session's settings, refused before anything loads if one is out of range."""
    settings = settings_from_args(args)
    problem = setting_problem(settings)
    if problem is not None:
        key, message = problem
        raise InvalidParameterError("--" + key.replace("_", "-"), settings.get(key), message)
    return settings


def main(args) -> int:
    for stream in (sys.stdout, sys.stderr):  # a legacy-encoding terminal must not crash on a Chinese answer
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    interactive = sys.stdin is not None and sys.stdin.isatty()
    console = Console(interactive)
    character = load_character(args.character)
    settings = checked_settings(args)
    tool_setup.check_flags(args)
    library = open_library(args)
    started = time.monotonic()
    try:
        backend, location = open_backend(args, character, console)
    except KeyboardInterrupt:
        print("glmkit: interrupted while starting the chat", file=sys.stderr)
        return INTERRUPTED
    if args.stats:
        console.notice(f"[loaded in {time.monotonic() - started:.2f}s]")
    conversation = Conversation(system=args.system, greeting=(character or {}).get("greeting"))
    agent, closing = None, []
    knowledge = knowledge_for(library, backend, args.reranker) if library is not None else None
    if knowledge is not None:
        closing.append(knowledge)
    if tool_setup.wants_tools(args):
        try:
            with console.loading("starting the tools"):
                extra = [knowledge_tool(knowledge, args.kb)] if knowledge is not None else []
                agent, more = tool_setup.build_agent(args, backend, settings, extra)
                closing += more
        except BaseException:
            backend.close()
            raise
    grounding = (knowledge, args.kb) if knowledge is not None and agent is None else None
    session = ChatSession(backend, console, conversation, settings, args.stats, agent=agent, knowledge=grounding)
    try:
        if interactive:
            return interactive_chat(session, console, args, location, character)
        return piped_chat(session, console, args.line_mode)
    except KeyboardInterrupt:  # outside an answer (reading stdin, a slow /save): end quietly
        return INTERRUPTED
    finally:
        for thing in closing:
            thing.close()
        backend.close()


def open_library(args):
    """The knowledge base folder for --kb, its name checked before a model loads (None without --kb)."""
    if args.kb is None:
        return None
    from ..rag import require
    from ..rag.library import Library, default_root

    require()
    library = Library(Path(args.kb_dir).expanduser() if args.kb_dir else default_root())
    library.open(args.kb).close()  # an unknown name lists the ones there are
    return library


def knowledge_for(library, backend, reranker: str | None = None):
    """The Knowledge for --kb: chunks are not made here, so the token counter only fits passages in the
    context: the model's own tokenizer when it is loaded here, an estimate for a server."""
    from ..rag.service import Knowledge

    llm = getattr(backend, "llm", None)
    count = (lambda text: len(llm.tokenizer.encode(text))) if llm is not None else (lambda text: len(text) // 2 + 1)
    return Knowledge(count, backend.name, library.root, None, reranker=reranker)


def knowledge_tool(knowledge, name: str):
    from ..tools.knowledge import knowledge_tool as make

    return make(knowledge, name)


def open_backend(args, character: dict | None, console: Console):
    """(backend, where it runs: a short text for /show)."""
    from .backends import LocalBackend, RemoteBackend

    if args.url:
        with console.loading(f"connecting to {args.url}"):
            backend = RemoteBackend(args.url, args.api_key, args.model, character)
        return backend, backend.base
    with console.loading(f"loading {args.model or 'the default model'}"):
        # One conversation at a time: the KV pool need not hold more than one context (a smaller pool to
        # allocate and touch at start-up, about 2 s less on the default model than the 2 GiB serving default).
        llm = load_llm(args, max_num_seqs=1)
    backend = LocalBackend(llm, character)
    return backend, f"local, {backend.max_model_len}-token context"


def interactive_chat(session: ChatSession, console: Console, args, location: str, character) -> int:
    from .prompt import Prompt
    from .slash import QUIT, Commands, parse_command

    commands = Commands(session, console, location)
    prompt = Prompt(commands.names, use_history_file=not args.no_history)
    welcome = WELCOME.format(name=session.backend.name)
    console.notice(welcome)
    _show_greeting(session, console)
    label = _prompt_label(console, (character or {}).get("user_name") or "用户")
    while True:
        notice = prompt.take_history_notice()
        if notice:
            console.notice(notice)
        try:
            text = prompt.read(label)
        except KeyboardInterrupt:
            console.notice("(Ctrl-C stops an answer; to quit, type /bye or press Ctrl-D)")
            continue
        except EOFError:
            return 0
        line = text.strip()
        if not line:
            continue
        if line in DEMO_QUIT_WORDS:
            return 0
        if line == "clear":  # the demos' clear: a fresh screen as well as a fresh conversation
            session.conversation.reset()
            console.write("\033[2J\033[H")
            console.notice(welcome)
            continue
        command = parse_command(line)
        if command is not None:
            if commands.run(*command) == QUIT:
                return 0
            continue
        session.ask(line)


def _show_greeting(session: ChatSession, console: Console) -> None:
    messages = session.conversation.messages
    if messages and messages[-1]["role"] == "assistant":
        console.answer_header(session.backend.name)
        console.write_answer(messages[-1]["content"] + "\n")


def _prompt_label(console: Console, user_label: str):
    from prompt_toolkit.formatted_text import ANSI

    return ANSI("\n" + console.paint(user_label, BOLD_GREEN) + "：")


def piped_chat(session: ChatSession, console: Console, line_mode: bool) -> int:
    """stdin as bytes, decoded leniently: one undecodable byte must not end a scripted run."""
    warned = False

    def decoded(data: bytes) -> str:
        nonlocal warned
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            if not warned:
                console.warn("warning: stdin is not valid UTF-8; undecodable bytes were replaced by U+FFFD")
                warned = True
            return data.decode("utf-8", errors="replace")

    if sys.stdin is None:  # started with stdin closed: nothing to say
        return 0
    stdin = sys.stdin.buffer
    if not line_mode:
        text = decoded(stdin.read()).strip()
        if text:
            session.ask(text)
        return 0
    for raw in iter(stdin.readline, b""):
        text = decoded(raw).strip()
        if text:
            session.ask(text)
    return 0
