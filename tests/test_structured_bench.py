"""benchmarks/structured.py's conformance loop on a tiny random model: whatever such a model would write, the
grammar must hold each answer to its schema (formats included), so every answer validates. Also checks the
corpus itself (its shape and feature coverage), and that the grammar compiler rejects exactly its marked gaps."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from glmkit import LLM, SamplingParams

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# Shapes whose every value is bounded (closed objects, maxLength, patterns, enums): where a schema allows extra
# properties, free-length strings or unbounded numbers, a random model writes valid JSON that need not end within
# any token budget. Together: nested objects to depth 4, $ref/$defs, oneOf with const discriminators, anyOf,
# nullable, enums, const, formats (date, date-time, uri, uuid, ipv4, email), patterns, multipleOf,
# exclusiveMinimum, non-ASCII property names, a map (additionalProperties: schema).
IDS = ["payment.strict", "firewall_rule.defs", "cn_identity.strict", "page_view_event.strict", "k8s_deployment.strict",
       "api_key_request.strict", "cn_train_ticket.defs", "prescription.base", "audit_log.defs",
       "server_config.strict", "cn_sentiment.strict", "dns_record.strict", "feature_flags.strict"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("structured_bench", BENCH / "structured.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(bench):
    return bench.load_corpus(BENCH / "schemas" / "schemas.jsonl")


def test_corpus_is_well_formed(bench, corpus):
    import jsonschema

    assert len(corpus) >= 200
    assert len({e["id"] for e in corpus}) == len(corpus)
    for entry in corpus:  # (benchmarks/schemas/build.py checks every schema against its metaschema)
        assert entry["prompt"].strip() and isinstance(entry["schema"], dict), entry["id"]
        if entry["id"] in IDS:
            jsonschema.validators.validator_for(entry["schema"]).check_schema(entry["schema"])
    covered = set().union(*(bench.features(e["schema"]) for e in corpus))
    for feature in ("object depth 3", "minItems/maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "pattern",
                    "format: date", "format: date-time", "format: email", "format: uri", "format: uuid",
                    "format: ipv4", "minLength/maxLength", "exclusiveMinimum", "multipleOf", "boolean",
                    "null / nullable", "optional properties", "additionalProperties: false"):
        assert feature in covered, feature
    assert not bench.unchecked_formats(corpus), "jsonschema's format checkers are missing (jsonschema[format-nongpl])"


@pytest.fixture(scope="module")
def llm(glm_dir):
    return LLM(str(glm_dir), dtype="float32", device="cpu")


def test_only_marked_gaps_are_rejected(bench, corpus, llm):
    for entry in corpus:
        _, params = bench.chat_request(llm, entry, SamplingParams(max_tokens=8))
        error = bench.compile_error(llm, params)
        assert (error is not None) == bool(entry.get("gap")), (entry["id"], error)


def test_random_model_answers_conform(bench, corpus, llm):
    # A random model spends its tokens on whatever whitespace the grammar allows: compact JSON here (the
    # schema's own x-guidance style; real models write the default style, benchmarks/structured.py)
    compact = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    entries = [{**e, "schema": {**e["schema"], "x-guidance": compact}} for e in corpus if e["id"] in IDS]
    assert len(entries) == len(IDS)
    # Sampled (seeded) rather than greedy: a random model's argmax tends to repeat one token up to a length limit.
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=600)
    results = bench.run_conformance(llm, entries, None, batch=len(entries), params=params, log=lambda *a, **k: None)
    bad = [(r["id"], r["status"], r["reason"], r["text"]) for r in results if r["status"] != "valid"]
    assert not bad, json.dumps(bad, ensure_ascii=False, indent=1)
