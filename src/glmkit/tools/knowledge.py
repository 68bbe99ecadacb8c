"""search_knowledge_base: a knowledge base's retrieval as a tool, for the agent loop (`glmkit chat --kb NAME`
with tools on): the model decides when to look something up, and sees numbered passages with their sources."""

from __future__ import annotations

from typing import Annotated

from .base import Tool
from .signatures import function_tool

MAX_TOP_K = 10


def knowledge_tool(knowledge, name: str) -> Tool:
    """The tool over knowledge base `name` of a rag.service.Knowledge."""
    from ..rag.answer import where

    def search_knowledge_base(
            query: Annotated[str, "What to look for: a question or key words, in the documents' language"],
            top_k: Annotated[int, "How many passages to return", {"minimum": 1, "maximum": MAX_TOP_K}] = 5) -> str:
        hits = knowledge.search(name, query, top_k)
        if not hits:
            return "No passage of the documents matches this query."
        return "\n\n".join(f"[{n}] {where(h)}\n{h.chunk.text}" for n, h in enumerate(hits, 1))

    description = (f"Search the user's documents (knowledge base {name!r}) for passages about a query. Returns "
                   "numbered passages with their file and section; cite them as [1], [2] in the answer.")
    return function_tool(search_knowledge_base, description=description)
