"""Answering from retrieved passages: the passages go into a system message, numbered, within the context
budget; the model is asked to answer from them only and to cite them as [1], [2]. When retrieval found nothing
above its thresholds the answer is a fixed "not in the documents" sentence and the model is not asked at all:
a small model given no evidence invents one.

A system message rather than the question's turn: asked in the user turn to answer and cite, the embedded 0.5B
model wrote only "[1]"; with the passages as system text it answers in a sentence. Formats without a system
role (ChatGLM2) put system text in front of the question, as their official demo does."""

from __future__ import annotations

import re
from collections.abc import Callable

from . import Hit
from .text import language

NOT_FOUND = {"en": "I could not find an answer to this in the knowledge base's documents.",
             "zh": "知识库的文档中没有找到与这个问题相关的内容。"}
_INSTRUCTIONS = {
    "en": ("Answer the user's question using only the numbered passages below, in full sentences, and cite the "
           "passages you used as [1], [2]. If the passages do not answer it, say that the documents do not say."),
    "zh": "请只根据下面编号的资料，用完整的句子回答用户的问题，并用 [1]、[2] 标出所依据的资料。如果资料中没有答案，请说明文档中没有相关内容。",
}
_CITE = re.compile(r"\[(\d{1,3})\]")


def where(hit: Hit) -> str:
    """'file > heading (p. 3)': how a passage is named in the prompt and on screen."""
    chunk = hit.chunk
    place = chunk.source + (f" > {chunk.heading}" if chunk.heading else "")
    return place + (f" (p. {chunk.page})" if chunk.page else "")


def fit(hits: list[Hit], count_tokens: Callable[[str], int], budget: int) -> list[Hit]:
    """The best hits whose passages fit `budget` tokens together (at least the first, cut to fit if it must)."""
    kept, used = [], 0
    for hit in hits:
        cost = count_tokens(where(hit)) + count_tokens(hit.chunk.text) + 4
        if used + cost > budget:
            break
        kept.append(hit)
        used += cost
    return kept or hits[:1]


def passages_text(question: str, hits: list[Hit]) -> str:
    """The instructions and the numbered passages, in the question's language."""
    numbered = "\n\n".join(f"[{n}] {where(h)}\n{h.chunk.text}" for n, h in enumerate(hits, 1))
    return f"{_INSTRUCTIONS[language(question)]}\n\n{numbered}"


def with_passages(messages: list[dict], hits: list[Hit], question: str) -> list[dict]:
    """`messages` with the passages in the system message (after the caller's own system text, if any)."""
    block = passages_text(question, hits)
    if messages and messages[0].get("role") == "system":
        return [dict(messages[0], content=f"{text_of(messages[0])}\n\n{block}"), *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def text_of(message: dict) -> str:
    """A message's text, whether its content is a string or OpenAI's list of parts."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def last_question(messages: list[dict]) -> str | None:
    users = [m for m in messages if m.get("role") == "user"]
    return text_of(users[-1]).strip() or None if users else None


def citations(hits: list[Hit], answer: str | None = None) -> list[dict]:
    """The passages given to the model, numbered as in the prompt; `cited` says whether the answer names them."""
    named = {int(n) for n in _CITE.findall(answer)} if answer is not None else set()
    out = []
    for n, hit in enumerate(hits, 1):
        item = {"index": n, **hit.citation()}
        if answer is not None:
            item["cited"] = n in named
        out.append(item)
    return out


class Grounded:
    """A chat turn prepared from a knowledge base: the messages to send (a system message carries the
    passages), the passages given, and the question they were retrieved for. No hits: answer `not_found()`."""

    def __init__(self, messages: list[dict], hits: list[Hit], question: str):
        self.messages, self.hits, self.question = messages, hits, question

    def not_found(self) -> str:
        return NOT_FOUND[language(self.question)]

    def citations(self, answer: str | None = None) -> list[dict]:
        return citations(self.hits, answer)


def ground(messages: list[dict], hits: list[Hit], question: str, count_tokens: Callable[[str], int],
           room: int) -> Grounded:
    """Put the hits that fit into the system message. room: the tokens left in the context for the whole
    conversation and its answer's passages (context minus the answer's max tokens)."""
    if not hits:
        return Grounded(messages, [], question)
    used = sum(count_tokens(text_of(m)) for m in messages) + 16 * len(messages)
    kept = fit(hits, count_tokens, max(room - used - count_tokens(_INSTRUCTIONS[language(question)]) - 32, 0))
    return Grounded(with_passages(messages, kept, question), kept, question)
