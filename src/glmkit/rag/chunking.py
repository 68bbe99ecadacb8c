"""Cut a Document into Chunks sized in the chat model's tokens, at sentence ends, never across a section."""

from __future__ import annotations

import re
from typing import Callable

from ..errors import InvalidParameterError
from . import Chunk, Document

_CLOSERS = "”’」』）》】)\\]\"'"
_SENTENCE_END = re.compile(rf"(?:[。！？；…]+[{_CLOSERS}]*|[.!?;]+[{_CLOSERS}]*(?=\s|\Z)|\n)\s*")
_BREAK = re.compile(r"[\s，、,：:；;。.！!？?）)」”]")
_MAX_CHARS_PER_TOKEN = 10  # bounds the search for where to cut an over-long sentence


def split(document: Document, count_tokens: Callable[[str], int], size: int = 300, overlap: int = 50) -> list[Chunk]:
    """Chunks of at most `size` tokens; each starts with the last whole sentences (up to `overlap` tokens) of the
    one before it in the same section, so a fact that straddles a cut is whole in one of them."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InvalidParameterError("size", size, "must be a positive whole number of tokens, e.g. 300")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < size:
        raise InvalidParameterError("overlap", overlap, f"must be a whole number of tokens from 0 to size-1 "
                                                        f"({size - 1}), e.g. {size // 6}")
    chunks = []
    for section in document.sections:
        for text in _section_chunks(section.text.strip(), count_tokens, size, overlap):
            chunks.append(Chunk(document.source, section.heading, section.page, text))
    return chunks


def _section_chunks(text: str, count_tokens: Callable[[str], int], size: int, overlap: int) -> list[str]:
    """Packs whole sentences greedily on their summed counts, then checks each chunk's real count: a tokenizer
    may merge across a sentence boundary differently from the sentences counted one by one."""
    pieces: list[str] = []
    counts: list[int] = []
    for sentence in _sentences(text):
        for piece, count in _cut(sentence, count_tokens, size):
            pieces.append(piece)
            counts.append(count)
    chunks = []
    start = end = 0
    while end < len(pieces):
        new = end
        end = new + 1
        total = sum(counts[start:end])
        while total > size and start < new:
            total -= counts[start]
            start += 1
        while end < len(pieces) and total + counts[end] <= size:
            total += counts[end]
            end += 1
        chunk = "".join(pieces[start:end]).strip()
        while end - start > 1 and count_tokens(chunk) > size:
            if end - 1 > new:
                end -= 1
            else:
                start += 1
            chunk = "".join(pieces[start:end]).strip()
        if chunk:
            chunks.append(chunk)
        start = _overlap_start(counts, start, end, overlap)
    return chunks


def _overlap_start(counts: list[int], start: int, end: int, overlap: int) -> int:
    """The first of the chunk's last whole sentences that fit in `overlap`; never the chunk's own first one,
    so each chunk moves on."""
    first, total = end, 0
    while first - 1 > start and total + counts[first - 1] <= overlap:
        first -= 1
        total += counts[first]
    return first


def _sentences(text: str) -> list[str]:
    """Consecutive pieces of `text` (joined, they give it back), each ending after a sentence end, its closing
    quotes or brackets and the whitespace after it; a line break ends a piece too (list items, headings)."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if match.end() > start:
            pieces.append(text[start:match.end()])
            start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _cut(sentence: str, count_tokens: Callable[[str], int], size: int) -> list[tuple[str, int]]:
    """The sentence with its token count, or, longer than `size` tokens, in pieces that fit: cut after a space or
    punctuation mark where one is in the second half of the piece, else between characters. Only a single
    character counted as more than `size` tokens can still exceed it. A long remainder is never counted whole
    (a megabyte without a sentence end would make that quadratic)."""
    window = size * _MAX_CHARS_PER_TOKEN
    pieces = []
    rest = sentence
    count = count_tokens(rest.strip()) if len(rest) <= window else size + 1
    while count > size:
        length = _longest_fitting(rest[:window], count_tokens, size)
        breaks = [match.end() for match in _BREAK.finditer(rest, length // 2, length)]
        length = breaks[-1] if breaks else length
        while length < len(rest) and rest[length].isspace():
            length += 1
        pieces.append((rest[:length], count_tokens(rest[:length].strip())))
        rest = rest[length:]
        count = count_tokens(rest.strip()) if len(rest) <= window else size + 1
    return pieces + [(rest, count)] if rest else pieces


def _longest_fitting(text: str, count_tokens: Callable[[str], int], size: int) -> int:
    """The longest prefix of `text` (at least one character) within `size` tokens, by bisection."""
    low, high = 1, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(text[:middle].strip()) <= size:
            low = middle
        else:
            high = middle - 1
    return low
