"""Schemathesis over every operation of the server's own /openapi.json, against a real `glmkit serve` process on the
tiny random ChatGLM3 checkpoint: at least MIN_CASES generated requests, positive and negative, through all of
schemathesis's phases (coverage, fuzzing, stateful) and all of its checks, and not one failure.

The checks hold the server to its schema both ways: no 5xx; every status, content type and body as documented
(the SSE streams included: each event's `data:` is checked against its event model); every schema-valid request
accepted and every schema-violating one rejected; a DELETEd response gone, a created one there; the API key
enforced wherever the schema declares it (the server runs with a key, so `ignored_auth` has work to do); 405s
with a true `Allow`; every response within MAX_RESPONSE_S.

What no schema can say, a `before_call` hook settles before each request is sent (schemathesis revalidates a
case a hook changed, so a case is positive or negative by what is actually sent):
- generation stays short: max_tokens and friends at most MAX_TOKENS and n at most 2 (the tiny model writes ~200
  tokens/s here; the defaults, 4096 tokens or the whole context, would take seconds per case), and the legacy
  `POST /`'s max_length, which counts the prompt's tokens too (as in the ChatGLM demo), just above the prompt;
- most requests name the served model (any other name is a documented 404 that ends the request early), and
  one in three generation requests is streamed;
- a tool choice that asks for a call names a declared tool (or becomes "auto" when none is declared);
- a previous_response_id that the server cannot have made is dropped.
A few refusals of schema-valid requests are expected (`known_refusal`: they depend on token counts, on what is
stored, on what JSON a string holds, on which JSON schemas the constrained decoder compiles); they are counted
and printed, never failures, and no other refusal is excused.

/v1/embeddings answers its documented 404 here (--embedding-model none); the test at the end serves a tiny
sentence-transformers model and runs the same checks over that operation (about 30 s). The first test takes
about a minute with the server's start, so it is marked slow.
Set GLMKIT_SCHEMA_SEED to replay a run, GLMKIT_FUZZ_SCALE to generate more cases.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import pytest

from server_fixtures import ServerProcess

from glmkit.tokenizers.base import clean_text

schemathesis = pytest.importorskip("schemathesis")

KEY = "schema-test-key"
MODEL = "tiny"
MAX_TOKENS = 4
MAX_RESPONSE_S = 5.0
MIN_CASES = 2000
MAX_EXAMPLES = int(20 * float(os.environ.get("GLMKIT_FUZZ_SCALE", "1")))  # fuzzing: per operation and mode
SEED = int(os.environ.get("GLMKIT_SCHEMA_SEED", "20240601"))
SERVE_ARGS = ("--served-model-name", MODEL, "--dtype", "float32", "--threads", "1", "--kv-cache-memory", "0.02",
              "--max-model-len", "8192", "--api-key", KEY,
              # prompts x n at their schema maxima (256 x 16) fit the queue: a request the schema allows is never
              # "more sequences than the server runs at once"
              "--max-queue", "4096",
              # chat and responses requests without max_tokens
              "--default-max-tokens", str(MAX_TOKENS))
STREAMING = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")
ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens")
RESPONSE_ID = re.compile(r"resp_[A-Za-z0-9]{32}")
CHECKS = {"not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
          "response_schema_conformance", "negative_data_rejection", "positive_data_acceptance",
          "missing_required_header", "unsupported_method", "allow_header_conformance", "use_after_free",
          "ensure_resource_availability", "ignored_auth", "object_level_authorization", "max_response_time"}
OPERATIONS = {"GET /health", "GET /ready", "GET /metrics", "GET /v1/models", "GET /v1/models/{model_id}",
              "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/embeddings", "POST /",
              "POST /v1/responses", "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}",
              "GET /v1/responses/{response_id}/input_items", "POST /v1/messages", "POST /v1/messages/count_tokens",
              "POST /v1/load_lora_adapter", "POST /v1/unload_lora_adapter",
              "GET /v1/knowledge_bases", "POST /v1/knowledge_bases", "GET /v1/knowledge_bases/{name}",
              "DELETE /v1/knowledge_bases/{name}", "PUT /v1/knowledge_bases/{name}/files/{source}",
              "DELETE /v1/knowledge_bases/{name}/files/{source}", "POST /v1/knowledge_bases/{name}/search"}


# --- settling what no schema can say ----------------------------------------------------------------------------

@dataclass
class Served:
    """What the hook needs to know of the server under test."""
    names: dict = field(default_factory=dict)   # path -> the model name its requests mostly send
    tokenizer: object = None                    # the tiny model's, for the legacy route's max_length
    refusals: Counter = field(default_factory=Counter)  # known refusals seen, by reason


SERVED = Served()


def _whole(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()


def _legacy_prompt_tokens(body: dict) -> int:
    """At least as many tokens as the legacy route's prompt has: the texts' own, and a few per message for the
    chat template."""
    history = body.get("history")
    texts = [body.get("prompt")] + [x for pair in history if isinstance(pair, list) for x in pair] \
        if isinstance(history, list) else [body.get("prompt")]
    return sum(len(SERVED.tokenizer.encode(clean_text(t))) if isinstance(t, str) else 0 for t in texts) \
        + 8 * len(texts) + 8


def _names(tools) -> list[str]:
    """The function names a request's tools declare (in any shape the routes take; [] for anything else)."""
    from glmkit.chat.messages import normalize_tools

    if isinstance(tools, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        return [t["name"] for t in tools]  # the Responses and Anthropic shapes
    try:
        return [t["function"]["name"] for t in normalize_tools(tools) or []]
    except Exception:  # noqa: BLE001 - not tools at all (a negative case)
        return []


def _tool_choice(choice, names: list[str], path: str):
    """A choice that asks for a call only of a declared tool: of the first one, or "auto" without tools."""
    if path in ANTHROPIC:
        if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
            if not names:
                return {**choice, "type": "auto"}
            if choice.get("type") == "tool" and isinstance(choice.get("name"), str):
                return {**choice, "name": names[0]}
        return choice
    if choice == "required" and not names:
        return "auto"
    if not isinstance(choice, dict):
        return choice
    if path == "/v1/responses" and choice.get("type") == "allowed_tools" and choice.get("mode") in ("auto", "required"):
        return {**choice, "tools": [{"type": "function", "name": names[0]}]} if names else "auto"
    function = choice.get("function")
    if isinstance(function, dict) and isinstance(function.get("name"), str):  # chat's named tool_choice
        return {**choice, "function": {**function, "name": names[0]}} if names else "auto"
    if isinstance(choice.get("name"), str):  # the Responses tool_choice, chat's older function_call
        return {**choice, "name": names[0]} if names else "auto"
    return choice


def settle(context, case, kwargs) -> None:
    """The `before_call` hook: settle what the schema cannot (see the module docstring)."""
    body = case.body
    if context.operation is None or not isinstance(body, dict) or case.operation.method.upper() != "POST":
        return
    path, new = case.operation.path, dict(body)
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if _whole(new.get(key)) and new[key] > MAX_TOKENS:
            new[key] = MAX_TOKENS
    if path == "/v1/completions" and "max_tokens" in new and new["max_tokens"] is None:
        new["max_tokens"] = MAX_TOKENS  # null: "until the context is full"
    if _whole(new.get("n")) and new["n"] > 2:
        new["n"] = 2
    if path == "/":
        length = new.get("max_length")
        if length is None or (_whole(length) and length >= 0):  # 0 and null: 2048, the demo's default
            new["max_length"] = _legacy_prompt_tokens(new) + MAX_TOKENS
    else:
        draw = zlib.crc32(case.id.encode())
        if isinstance(new.get("model"), str) and path in SERVED.names and draw % 5:
            new["model"] = SERVED.names[path]
        if path in STREAMING and isinstance(new.get("stream", False), bool) and draw % 3 == 0:
            new["stream"] = True
    if "tool_choice" in new:
        new["tool_choice"] = _tool_choice(new["tool_choice"], _names(new.get("tools")), path)
    if path == "/v1/chat/completions" and "function_call" in new and not new.get("tools"):
        new["function_call"] = _tool_choice(new["function_call"], _names(new.get("functions")), path)
    previous = new.get("previous_response_id")
    if path == "/v1/responses" and isinstance(previous, str) and not RESPONSE_ID.fullmatch(previous):
        new["previous_response_id"] = None
    if new != body:
        case.body = new


def known_refusal(context, failure, case, response) -> bool:
    """The `filter_failure` hook: False for a schema-valid request that the server must refuse for what no
    schema can know: a prompt longer than the context (a token count); a previous response or an input item that
    is not stored (any more); a JSON schema (of an answer, of a tool's parameters) that the constrained decoder
    cannot compile; tool-call arguments between braces that are not JSON (a JSON schema's contentMediaType and
    contentSchema only annotate a string); an uploaded file whose bytes are not a readable document; dense search of a knowledge base made
    without embeddings; a chunk overlap not below the chunk size (one field bounded by another)."""
    from schemathesis.openapi.checks import RejectedPositiveData

    if not isinstance(failure, RejectedPositiveData) or response.status_code != 400:
        return True
    error = json.loads(response.content)["error"]
    reason = next((reason for reason, (code, text) in KNOWN_REFUSALS.items()
                   if (code and error.get("code") == code) or (text and text in error["message"])), None)
    if reason is None:
        return True
    SERVED.refusals[reason] += 1
    return False


# reason -> (the error code, or a text of the message: Anthropic's errors carry no code)
KNOWN_REFUSALS = {"context length": ("context_length_exceeded", "(max_model_len)"),
                  "no such previous response": ("previous_response_not_found", None),
                  "no such stored item": (None, "names no stored item"),
                  "JSON schema the decoder cannot compile": (None, "cannot be used for constrained decoding"),
                  "arguments not JSON": (None, "must be the text of a JSON object"),
                  "a file that is not a document": ("unreadable_file", None),
                  "dense search of a keyword-only knowledge base": (None, "has no embeddings"),
                  "overlap not below chunk_tokens": (None, "must be an integer from 0 to chunk_tokens - 1")}


# --- running schemathesis ---------------------------------------------------------------------------------------

def _answer(response) -> str:
    """"200", "200 stream", "400", ...: what the server answered."""
    content_type = (response.headers.get("content-type") or [""])[0]
    return f"{response.status_code}{' stream' if content_type.startswith('text/event-stream') else ''}"


@dataclass
class Run:
    cases: int
    operations: set
    answers: Counter
    checks: Counter
    failures: list
    summary: str


def run_schemathesis(url: str, operation: str | None = None, max_examples: int = MAX_EXAMPLES) -> Run:
    """Every phase and check of schemathesis over the server's schema (or over one operation of it)."""
    from schemathesis.config import SchemathesisConfig
    from schemathesis.engine import events, from_schema
    from schemathesis.engine.statistic import Statistic

    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        "base-url": url,
        # One worker: hypothesis describes filters with ast.parse, which is not thread-safe on Python 3.11
        # ("AST constructor recursion depth mismatch").
        "workers": 1,
        "request-timeout": 60,
        "continue-on-failure": True,
        "suppress-health-check": ["all"],
        "auth": {"openapi": {"bearer": {"bearer": KEY}}},
        "generation": {"mode": "all", "max-examples": max_examples, "database": "none"},
        "checks": {"enabled": True, "max_response_time": MAX_RESPONSE_S},
        "phases": {name: {"enabled": True} for name in ("examples", "coverage", "fuzzing", "stateful")},
    })
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config,
                                           headers={"Authorization": f"Bearer {KEY}"})
    assert {op.ok().label for op in schema.get_all_operations()} == OPERATIONS
    if operation is not None:
        schema = schema.include(path=operation)
    schema.hook("filter_failure")(known_refusal)
    SERVED.refusals.clear()

    statistic, errors, checks, phases, answers = Statistic(), [], Counter(), Counter(), Counter()
    start = time.monotonic()
    schemathesis.hook("before_call")(settle)  # schemathesis calls only global before_call hooks
    try:
        for event in from_schema(schema).execute():
            if isinstance(event, (events.ScenarioFinished, events.FuzzScenarioFinished)):
                if isinstance(event, events.ScenarioFinished) and not event.is_test_scenario:
                    continue
                statistic.on_scenario_finished(event.recorder)
                phases[getattr(event, "phase", "fuzz").value] += len(event.recorder.cases)
                for results in event.recorder.checks.values():
                    checks.update(result.name for result in results)
                answers.update(_answer(i.response) for i in event.recorder.interactions.values()
                               if i.response is not None)
            elif isinstance(event, events.NonFatalError):
                errors.append(f"{event.label}: {event.info.title}\n{event.info.message}\n{event.info.traceback}")
            elif isinstance(event, events.FatalError):
                raise event.exception
            elif isinstance(event, events.EngineFinished) and event.failures:
                statistic.record_run_check_failures(event.failures, label="run")
    finally:
        schemathesis.hooks.unregister(settle)

    failures = errors + [f"{label}\n" + group.format(index=i, curl=group.code_sample, config=schema.config.output)
                         for label, groups in statistic.failures.items() for i, group in enumerate(groups.values(), 1)]
    summary = (f"{statistic.total_cases} cases in {time.monotonic() - start:.0f}s over "
               f"{len(statistic.tested_operations)} operations (seed {SEED}); cases by phase {dict(phases)}; "
               f"answers {dict(answers)}; known refusals {dict(SERVED.refusals)}; checks {dict(checks)}")
    print(summary)
    return Run(statistic.total_cases, statistic.tested_operations, answers, checks, failures, summary)


def assert_clean(run: Run, server: ServerProcess, min_cases: int, operations: set) -> None:
    failures = "\n\n".join(run.failures[:30])
    assert not run.failures, f"{len(run.failures)} failures:\n\n{failures}\n\n{run.summary}"
    assert run.cases >= min_cases, run.summary
    assert run.operations == operations, run.summary
    assert set(run.checks) == CHECKS, run.summary
    assert server.proc.poll() is None, server.output()[-3000:]
    assert "Traceback" not in server.output(), server.output()[-5000:]


# --- the tests --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_tokenizer(sp):
    SERVED.tokenizer = sp
    yield sp
    SERVED.tokenizer = None


@pytest.mark.slow  # about a minute: ~3,200 cases in 45-60 s on two busy cores, and the server's start
def test_schemathesis_finds_no_failure(tiny_dir, served_tokenizer, tmp_path):
    server = ServerProcess("--model", str(tiny_dir), "--embedding-model", "none", "--kb-dir", str(tmp_path),
                           *SERVE_ARGS)
    SERVED.names = {path: MODEL for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/",
                                             *ANTHROPIC)}
    try:
        run = run_schemathesis(server.url)
        assert_clean(run, server, MIN_CASES, OPERATIONS)
    finally:
        server.stop()


def tiny_sentence_transformer(out) -> str:
    """A sentence-transformers model of one 16-wide BERT layer over a character WordPiece vocabulary, built
    offline; -> its directory (the name the server serves it under)."""
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6 (its `models` still works, with a deprecation warning)
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127)]
    vocab = {token: i for i, token in enumerate(specials + chars + ["##" + c for c in chars])}
    wordpiece = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    hf = out / "hf"
    BertTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(hf)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=128)).save_pretrained(hf)
    word = models.Transformer(str(hf), max_seq_length=128)
    model_dir = out / "tiny-embedder"
    SentenceTransformer(modules=[word, models.Pooling(16)], device="cpu").save(str(model_dir))
    return str(model_dir)


def test_schemathesis_on_embeddings_with_a_model(tiny_dir, served_tokenizer, tmp_path):
    """The one operation the test above leaves at its 404: served by a tiny sentence-transformers model."""
    pytest.importorskip("sentence_transformers")
    embedder = tiny_sentence_transformer(tmp_path)
    server = ServerProcess("--model", str(tiny_dir), "--embedding-model", embedder, "--kb-dir", str(tmp_path / "kb"),
                           *SERVE_ARGS)
    SERVED.names = {"/v1/embeddings": "tiny-embedder"}
    try:
        run = run_schemathesis(server.url, "/v1/embeddings", max_examples=10 * MAX_EXAMPLES)
        assert_clean(run, server, 250, {"POST /v1/embeddings"})
        assert run.answers["200"] >= 50, run.summary  # embeddings, checked against their schema
    finally:
        server.stop()
