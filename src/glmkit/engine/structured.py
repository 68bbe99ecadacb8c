"""Constrained decoding: a request's output held to a grammar (a JSON schema, any JSON object, a regex, a
choice of strings, or a Lark grammar) by masking the logits of every token that cannot continue it.

Built on llguidance (a prebuilt wheel with no dependencies): its Lark dialect embeds JSON schemas (`%json`),
names special tokens (`<[id]>`), and its matcher computes a token bitmask in tens of microseconds. Every kind of
constraint is carried as one Lark text (`StructuredOutput.grammar`), so the chat layer can combine them (a tool
call or a JSON answer) and the engine handles one thing.

`Grammars` (one per loaded model) turns the tokenizer into llguidance's token table once, compiles each
distinct grammar once (callers compile off the engine thread with `check`), and hands each sequence its own
matcher. The engine fills the bitmask of its constrained rows before a step (`fill`); the sampler applies it
(sampler.py). Knows tokens and grammars; nothing of chat formats or HTTP.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InvalidParameterError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("glmkit")

# JSON as chat models write it, compact or pretty-printed: between tokens at most one newline and 16 spaces or
# tabs (unbounded whitespace lets a small model emit newlines forever; none at all forces a model that wants to
# indent off its own distribution); `oneOf` taken as `anyOf` (a schema the engine cannot prove disjoint would
# otherwise be refused).
JSON_STYLE = {"whitespace_flexible": True, "whitespace_pattern": r"\n?[ \t]{0,16}", "coerce_one_of": True}
# Schema keywords whose values are subschemas (or maps / lists of them) that grammar_schema walks into.
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
# Date-times as every common reader takes them (Python's datetime, pydantic, jsonschema's RFC 3339 checker):
# upper-case T and Z, seconds 00-59, February up to the 28th. The grammar engine's own `date-time` also allows
# t/z and a leap second anywhere (23:60), which those readers refuse.
_DATE = r"\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)|02-(?:0[1-9]|1\d|2[0-8]))"
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_FORMAT_PATTERNS = {"date-time": f"^{_DATE}T{_TIME}$", "date": f"^{_DATE}$", "time": f"^{_TIME}$"}


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match, as llguidance Lark text; `source` names the request field that
    asked for it (errors about the grammar name it)."""
    grammar: str
    source: str = field(default="structured", compare=False)

    @classmethod
    def json_schema(cls, schema: dict | str, source: str = "json_schema") -> StructuredOutput:
        return cls(f"start: {json_rule(schema, source)}\n", source)

    @classmethod
    def json_object(cls, source: str = "json_object") -> StructuredOutput:
        return cls.json_schema({"type": "object"}, source)

    @classmethod
    def regex(cls, pattern: str, source: str = "regex") -> StructuredOutput:
        return cls(f"start: /{lark_regex(pattern)}/\n", source)

    @classmethod
    def choice(cls, options: list[str], source: str = "choice") -> StructuredOutput:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise InvalidParameterError(source, options, "must be a non-empty list of non-empty strings")
        return cls("start: " + " | ".join(lark_string(o) for o in options) + "\n", source)

    @classmethod
    def lark(cls, text: str, source: str = "grammar") -> StructuredOutput:
        return cls(text if text.endswith("\n") else text + "\n", source)


def lark_string(text: str) -> str:
    """A Lark string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


def lark_regex(pattern: str) -> str:
    """A regex as the body of a Lark /.../ literal (slashes escaped; anchors are implied and dropped)."""
    pattern = pattern.removeprefix("^")
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return re.sub(r"(?<!\\)/", r"\\/", pattern)


def json_rule(schema: dict | str, source: str = "json_schema") -> str:
    """A Lark expression for one JSON value matching `schema`, written the way JSON_STYLE says."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InvalidParameterError(source, schema[:200], f"is not valid JSON: {e}")
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise InvalidParameterError(source, schema, "must be a JSON schema object")
    # A schema carrying llguidance's own style (x-guidance) is written its way instead
    style = {"coerce_one_of": True, **schema["x-guidance"]} if isinstance(schema.get("x-guidance"), dict) \
        else JSON_STYLE
    return "%json " + json.dumps({**grammar_schema(schema), "x-guidance": style}, ensure_ascii=False)


def grammar_schema(schema):
    """The schema the grammar is built from: every object that lists `properties` and says nothing about others
    closed (`additionalProperties: false`), as OpenAI's strict mode requires (left open, a small model invents
    keys until max_tokens; benchmarks/structured.py: 247 of 265 answers valid open, 265 closed), and date/time
    formats written as the patterns above. Whatever this schema accepts, the original accepts too. `allOf`
    branches stay as they are (closing each would reject the properties of the others)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict) and not {"additionalProperties", "unevaluatedProperties",
                                                         "patternProperties"} & set(out):
        out["additionalProperties"] = False
    if out.get("format") in _FORMAT_PATTERNS and "pattern" not in out:
        out["pattern"] = _FORMAT_PATTERNS[out.pop("format")]
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = grammar_schema(out[key])
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: grammar_schema(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [grammar_schema(v) for v in out[key]]
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = grammar_schema(out["additionalProperties"])
    return out


class _TokenTable:
    """What llguidance reads from a tokenizer: the bytes of every id (special tokens prefixed with 0xFF, as its
    convention marks them), which ids are special, and how to encode text. llguidance encodes the text a
    grammar forces, so the ids must spell exactly that text: where the tokenizer adds something (SentencePiece's
    leading space), a greedy longest match over the table is used instead."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokens = token_bytes(tokenizer, vocab_size)
        self.special_token_ids = sorted(i for i in tokenizer.special_tokens.values() if i < vocab_size)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else \
            (self.special_token_ids[0] if self.special_token_ids else 0)
        self.bos_token_id = tokenizer.bos_token_id
        self._encode = tokenizer.encode
        self._by_bytes: dict[bytes, int] = {}
        for i, b in enumerate(self.tokens):
            if b and not b.startswith(b"\xff"):
                self._by_bytes.setdefault(b, i)
        self._longest = max(map(len, self._by_bytes), default=1)

    def __call__(self, text) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self._encode(data.decode("utf-8", errors="replace"))
        if b"".join(self.tokens[i] for i in ids if i < len(self.tokens)) == data:
            return ids
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        ids, pos = [], 0
        while pos < len(data):
            for size in range(min(self._longest, len(data) - pos), 0, -1):
                found = self._by_bytes.get(data[pos:pos + size])
                if found is not None:
                    ids.append(found)
                    pos += size
                    break
            else:
                pos += 1  # a byte no token spells (never for byte-level or byte-fallback vocabularies)
        return ids


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each id stands for in generated text (b"" for ids the tokenizer does not have)."""
    table = tokenizer.token_bytes()
    special = {i: name for name, i in tokenizer.special_tokens.items()}
    out = []
    for i in range(vocab_size):
        if i in special:
            out.append(b"\xff" + special[i].encode("utf-8"))
        else:
            out.append(table[i] if i < len(table) and table[i] is not None else b"")
    return out


class Grammars:
    """The constrained-decoding state of one model: its token table and a cache of compiled grammars."""

    def __init__(self, tokenizer, vocab_size: int, max_cached: int = 512):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.num_words = (vocab_size + 31) // 32
        self.max_cached = max_cached
        self._lltokenizer = None
        self._compiled: OrderedDict[str, object] = OrderedDict()  # grammar text -> a fresh matcher to copy
        self._lock = threading.Lock()

    def _llg(self):
        """(llguidance module, tokenizer): built on first use (about a second for a 150k vocabulary)."""
        import llguidance

        with self._lock:
            if self._lltokenizer is None:
                self._lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(
                    _TokenTable(self.tokenizer, self.vocab_size)), n_vocab=self.vocab_size)
        return llguidance, self._lltokenizer

    def check(self, structured: StructuredOutput) -> None:
        """Compile `structured` (once; later calls hit the cache). Raises InvalidParameterError naming its
        source field when the grammar or schema cannot be used. Slow for a new large grammar: call it off the
        engine thread."""
        self._template(structured)

    def _template(self, structured: StructuredOutput):
        with self._lock:
            found = self._compiled.get(structured.grammar)
            if found is not None:
                self._compiled.move_to_end(structured.grammar)
                return found
        llguidance, lltokenizer = self._llg()
        grammar = "%llguidance {}\n" + structured.grammar
        matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)  # compiles with the GIL released
        if matcher.is_error():
            raise InvalidParameterError(structured.source, _shorten(structured.grammar),
                                        f"cannot be used for constrained decoding: {_first_line(matcher.get_error())}")
        with self._lock:
            self._compiled[structured.grammar] = matcher
            while len(self._compiled) > self.max_cached:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, structured: StructuredOutput):
        """A fresh matcher for one sequence."""
        return self._template(structured).deep_copy()

    def fill(self, matchers: list, stop_ids: list[frozenset[int]]) -> torch.Tensor:
        """The allowed-token bitmask [len(matchers), num_words] (int32; bit b of word w is id 32*w + b) of each
        sequence's next token. Where the grammar is complete, the sequence's stop ids are allowed (and only
        they end it); llguidance's own end-of-text id is allowed only if it is one of them. One matcher after
        another: measured on 1-16 sequences, faster than llguidance's thread pool (0.44 ms against 1.2 ms for 16)."""
        import torch

        masks = torch.empty(len(matchers), self.num_words, dtype=torch.int32)
        words = masks.numpy().view("uint32")  # the same memory, for the bit fixes below
        eos, base, size = self._llg()[1].eos_token, masks.data_ptr(), self.num_words * 4
        for i, (m, stops) in enumerate(zip(matchers, stop_ids)):
            m.unsafe_compute_mask_ptr(base + i * size, size)
            if eos not in stops:
                words[i, eos >> 5] &= ~(1 << (eos & 31)) & 0xFFFFFFFF
            failed = m.is_error()
            if failed:  # a resource limit of the matcher (never expected): the sequence ends here
                log.warning("glmkit: constrained decoding stopped a sequence early: %s", _first_line(m.get_error()))
            if failed or m.is_accepting():
                for t in stops:
                    if t < self.vocab_size:
                        words[i, t >> 5] |= 1 << (t & 31)
        return masks


def unpack_mask(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 words [R, W] -> bool [R, vocab_size] (True: allowed), on the words' device."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.view(words.shape[0], -1)[:, :vocab_size].bool()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid grammar"


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
