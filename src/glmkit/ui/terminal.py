"""`glmkit chat`: streaming multi-turn chat in the terminal, or over a pipe for scripts.

Commands typed as a whole line: `clear` forgets the conversation, `stop` / `exit` quits. Ctrl-C during an
answer stops that answer (the request is aborted at once) and keeps the session. Knows the LLM API only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..commands.args import add_model_arguments, add_sampling_arguments, load_llm, sampling_params
from ..errors import InvalidParameterError

WELCOME = ("Chatting with {name}. Type a message; `clear` clears the history, `stop` or `exit` quits, Ctrl-C stops "
           "an answer.\n欢迎使用 {name}，输入内容即可进行对话，clear 清空对话历史，stop 终止程序")


def add_arguments(p) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p, temperature=0.8, top_p=0.8, max_tokens=1024)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--character", default=None, metavar="PROFILE.json",
                   help="CharacterGLM profile: bot_name, bot_info, user_name, user_info (+ optional greeting)")
    p.add_argument("--stats", action="store_true", help="print time to first token and tokens/s after each answer")


def load_character(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        profile = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidParameterError("--character", path, f"cannot be read as a JSON profile ({e})")
    if not isinstance(profile, dict) or not profile.get("bot_name") or not profile.get("bot_info"):
        raise InvalidParameterError("--character", path, "needs non-empty bot_name and bot_info fields")
    return profile


class Session:
    def __init__(self, llm, params, system: str | None, character: dict | None, interactive: bool, stats: bool):
        self.llm, self.params, self.system, self.character = llm, params, system, character
        self.interactive, self.stats = interactive, stats
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []
        greeting = (self.character or {}).get("greeting")
        if greeting:
            self.history.append({"role": "assistant", "content": greeting})

    def answer(self, text: str, out=sys.stdout) -> str:
        self.history.append({"role": "user", "content": text})
        start, first, num_tokens, reply = time.monotonic(), None, 0, []
        stream = self.llm.stream_chat(self.history, self.params, character=self.character)
        try:
            for piece, delta in stream:
                first = first or time.monotonic()
                num_tokens += len(delta.token_ids)
                if piece:
                    reply.append(piece)
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            out.write("  [stopped]")
        finally:
            stream.close()
        out.write("\n")
        answer = "".join(reply).strip()
        self.history.append({"role": "assistant", "content": answer})
        if self.stats and first is not None:
            elapsed = time.monotonic() - first
            rate = (num_tokens - 1) / elapsed if num_tokens > 1 and elapsed > 0 else 0.0
            print(f"[first token {first - start:.2f}s, {num_tokens} tokens, {rate:.1f} tok/s]", file=sys.stderr)
        return answer


def main(args) -> int:
    started = time.monotonic()
    character = load_character(args.character)
    params = sampling_params(args)
    # One conversation at a time: the KV pool need not hold more than one context (a smaller pool to allocate
    # and touch at start-up, about 2 s less on the default model than the 2 GiB serving default).
    llm = load_llm(args, max_num_seqs=1)
    interactive = sys.stdin.isatty()
    name = (character or {}).get("bot_name") or llm.model_config.name or llm.model_dir.name
    session = Session(llm, params, args.system, character, interactive, args.stats)
    if args.stats:
        print(f"[loaded in {time.monotonic() - started:.2f}s]", file=sys.stderr)
    if interactive:
        print(WELCOME.format(name=name))
        if session.history and session.history[-1]["role"] == "assistant":
            print(f"\n{name}：{session.history[-1]['content']}")
    user_label = (character or {}).get("user_name") or "用户"
    while True:
        try:
            line = input(f"\n{user_label}：") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and line == "":
            break
        text = line.strip()
        if text in ("stop", "exit"):
            break
        if text == "clear":
            session.reset()
            if interactive:
                print("\033[2J\033[H" + WELCOME.format(name=name))
            continue
        if not text:
            continue
        if interactive:
            print(f"\n{name}：", end="", flush=True)
        session.answer(text)
    return 0
