"""Constrained decoding (JSON schemas through llguidance): does every answer conform, and what does it cost?

    python benchmarks/structured.py --conformance [--limit N] [--max-tokens 384] [--out FILE.json]
    python benchmarks/structured.py --cost [--repeats 3] [--concurrency 1 16] [--max-tokens 48]
    python benchmarks/structured.py --compile          # every schema through the grammar compiler, no model run
    (common: [--model PATH] [--schemas benchmarks/schemas/schemas.jsonl] [--threads N])

The corpus (benchmarks/schemas/schemas.jsonl, made by benchmarks/schemas/build.py) holds ~270 real-world JSON
schemas, each with a short user request; lines marked "gap" use a JSON-schema feature the grammar engine rejects.

--conformance: one greedy answer per schema from the default model, all in one engine run (max_num_seqs at a
time; each request with its own schema, through the chat layer exactly as `LLM.chat(response_format=...)` builds
it). Every answer is parsed and validated with `jsonschema` with format checking on (date, date-time, email, uri,
uuid, ipv4, ...). Prints the valid count, the finish reasons (a `length` finish is a truncated answer, counted
apart), every failure with its schema id and reason, and the schemas the grammar compiler rejected (with its
message). (glmkit closes objects that list their properties and say nothing of others, as OpenAI's strict mode
does; answers are validated against the schemas as written.)

--cost: output tokens/s of the same requests with and without their schemas at each concurrency. The requests are
the chat prompts of the first corpus schemas whose answers are long (strict variants), greedy, no ignore_eos, the
same max_tokens; both sides are expected to hit max_tokens, so they generate the same number of tokens (the table
shows the counts). One warm-up pass of each side first fills the prefix cache and compiles the grammars, so the
timed runs are decode plus the per-request grammar work (a matcher copy per request, a mask per token). The sides
run interleaved (A B A B ...), each level `--repeats` times; the table gives medians and the ratio measured in the
same run. It also gives the grammar compile time per schema (first use, and a cache hit) over the whole corpus,
and the time `Grammars.fill` takes per step and per constrained row during the constrained runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

SCHEMAS = Path(__file__).with_name("schemas") / "schemas.jsonl"


# -- the corpus ----------------------------------------------------------------------------------------------------
def load_corpus(path: Path = SCHEMAS, limit: int | None = None) -> list[dict]:
    entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return entries[:limit] if limit else entries


def features(schema) -> set[str]:
    """The JSON-schema features a schema uses (for the coverage table)."""
    found: set[str] = set()

    def walk(node, depth: int) -> None:
        if isinstance(node, list):
            for x in node:
                walk(x, depth)
            return
        if not isinstance(node, dict):
            return
        t = node.get("type")
        types = set(t) if isinstance(t, list) else {t} if t else set()
        if "object" in types or "properties" in node:
            found.add(f"object depth {min(depth + 1, 4)}" + ("+" if depth + 1 >= 4 else ""))
            props = node.get("properties", {})
            if set(props) - set(node.get("required", [])):
                found.add("optional properties")
            if node.get("required"):
                found.add("required properties")
            if node.get("additionalProperties") is False:
                found.add("additionalProperties: false")
            elif isinstance(node.get("additionalProperties"), dict):
                found.add("additionalProperties: schema (map)")
            if any(not k.isascii() for k in props):
                found.add("non-ASCII property names")
            for sub in props.values():
                walk(sub, depth + 1)
            walk(node.get("additionalProperties"), depth + 1)
        if "array" in types:
            found.add("array")
            if "minItems" in node or "maxItems" in node:
                found.add("minItems/maxItems")
            walk(node.get("items"), depth)
        if "null" in types or {"type": "null"} in node.get("anyOf", []):
            found.add("null / nullable")
        for key in ("enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern", "multipleOf", "exclusiveMinimum",
                    "exclusiveMaximum", "uniqueItems", "if"):
            if key in node:
                found.add(key)
        if "minLength" in node or "maxLength" in node:
            found.add("minLength/maxLength")
        if "minimum" in node or "maximum" in node:
            found.add("minimum/maximum")
        if "format" in node:
            found.add(f"format: {node['format']}")
        for kind in ("string", "integer", "number", "boolean"):
            if kind in types:
                found.add(kind)
        for key in ("anyOf", "oneOf", "allOf"):
            walk(node.get(key), depth)
        if isinstance(node.get("$defs"), dict):
            found.add("$defs")
            for sub in node["$defs"].values():
                walk(sub, depth)

    walk(schema, 0)
    return found


def validate(schema: dict, text: str) -> str | None:
    """None if `text` is JSON that conforms to `schema` (formats checked), else the reason."""
    import jsonschema
    from jsonschema import FormatChecker

    try:
        instance = json.loads(text)
    except ValueError as e:
        return f"not JSON: {e}"
    validator = jsonschema.validators.validator_for(schema)(schema, format_checker=FormatChecker())
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    return f"at {error.json_path}: {error.message}"


def unchecked_formats(corpus: list[dict]) -> list[str]:
    """Formats the corpus uses that this jsonschema install cannot check (their optional packages are missing)."""
    from jsonschema import FormatChecker

    used = {f.split(": ", 1)[1] for e in corpus if not e.get("gap") for f in features(e["schema"])
            if f.startswith("format: ")}
    return sorted(used - set(FormatChecker().checkers))


# -- requests ------------------------------------------------------------------------------------------------------
def response_format(entry: dict) -> dict:
    schema = entry["schema"]
    return {"type": "json_schema", "json_schema": {"name": entry["id"].replace(".", "_"), "schema": schema}}


def chat_request(llm, entry: dict, params, constrained: bool = True):
    """(ChatPrompt, SamplingParams) as LLM.chat builds them for one conversation with this schema."""
    serving = llm.chat_serving
    prompt = serving.render([{"role": "user", "content": entry["prompt"]}],
                            response_format=response_format(entry) if constrained else None)
    return prompt, serving.sampling_params(params, prompt, llm.engine.max_model_len)


def compile_error(llm, params) -> str | None:
    """The grammar compiler's complaint about a request's grammar, or None if it compiles."""
    from glmkit.errors import InvalidParameterError

    try:
        llm.engine.grammars.check(params.structured)
    except InvalidParameterError as e:
        text = str(e)
        marker = "cannot be used for constrained decoding: "
        return text.split(marker, 1)[1] if marker in text else text
    return None


# -- conformance ---------------------------------------------------------------------------------------------------
def _run_streaming(llm, requests, progress, every: int = 16):
    """(request, RequestOutput) pairs of one engine run over all `requests` ((entry, prompt, params, result)
    tuples; the engine runs up to its max_num_seqs at once), calling progress(finished) every `every` finishes."""
    import uuid

    from glmkit.engine.outputs import OutputCollector

    ids = [uuid.uuid4().hex for _ in requests]
    collectors = {rid: OutputCollector(rid, prompt.prompt_ids, 1) for rid, (_, prompt, _, _) in zip(ids, requests)}
    finished = 0
    for d in llm._deltas([(prompt.prompt_ids, params, rid) for rid, (_, prompt, params, _) in zip(ids, requests)]):
        collectors[d.request_id].add(d)
        if d.finished:
            finished += 1
            if finished % every == 0 and finished < len(requests):
                progress(finished)
    return [(request, collectors[rid].result()) for rid, request in zip(ids, requests)]


def run_conformance(llm, corpus: list[dict], max_tokens: int | None, batch: int, params=None,
                    log=print) -> list[dict]:
    """One constrained answer per schema (greedy unless `params` say otherwise); a result dict per entry: id,
    status (valid | invalid | length | rejected), reason, text, tokens, finish_reason."""
    from glmkit import SamplingParams

    base = params or SamplingParams(temperature=0, max_tokens=max_tokens)
    results, runnable = [], []
    for entry in corpus:
        prompt, params = chat_request(llm, entry, base)
        error = compile_error(llm, params)
        result = {"id": entry["id"], "gap": entry.get("gap"), "status": None, "reason": None, "text": None,
                  "tokens": 0, "finish_reason": None}
        results.append(result)
        if error is not None:
            result.update(status="rejected", reason=error)
        else:
            runnable.append((entry, prompt, params, result))
    start, done, tokens, bad = time.perf_counter(), 0, 0, 0
    for first in range(0, len(runnable), batch):
        chunk = runnable[first:first + batch]
        for (entry, prompt, _, result), out in _run_streaming(llm, chunk, progress=lambda n: log(
                f"  {done + n}/{len(runnable)} answered, {time.perf_counter() - start:.0f} s", flush=True)):
            choice = out.outputs[0]
            text = llm.chat_serving.parse(prompt, choice.token_ids).content
            reason = validate(entry["schema"], text)
            status = "valid" if reason is None else "length" if choice.finish_reason == "length" else "invalid"
            result.update(status=status, reason=reason, text=text, tokens=len(choice.token_ids),
                          finish_reason=choice.finish_reason)
            tokens += len(choice.token_ids)
            bad += status != "valid"
        done += len(chunk)
        elapsed = time.perf_counter() - start
        log(f"  {done}/{len(runnable)} answered, {bad} not valid so far, {tokens} tokens in {elapsed:.0f} s "
            f"({tokens / elapsed:.1f} tok/s)", flush=True)
    return results


def report_conformance(corpus: list[dict], results: list[dict], max_tokens: int) -> None:
    by_status = collections.Counter(r["status"] for r in results)
    finishes = collections.Counter(r["finish_reason"] for r in results if r["finish_reason"])
    answered = [r for r in results if r["status"] != "rejected"]
    print(f"\nschemas: {len(results)}  answered: {len(answered)}  max_tokens: {max_tokens}")
    print("\n| outcome | schemas |\n|---|---:|")
    print(f"| valid (conforms, formats checked) | {by_status['valid']} / {len(answered)} |")
    print(f"| invalid (complete answer that does not conform) | {by_status['invalid']} |")
    print(f"| truncated (finish_reason length) | {by_status['length']} |")
    print(f"| rejected by the grammar compiler | {by_status['rejected']} |")
    print("\n| finish_reason | answers |\n|---|---:|")
    for reason, count in finishes.most_common():
        print(f"| {reason} | {count} |")
    lengths = sorted(r["tokens"] for r in answered)
    if lengths:
        print(f"\nanswer tokens: median {statistics.median(lengths):.0f}, max {lengths[-1]}, "
              f"total {sum(lengths)}")
    failures = [r for r in results if r["status"] in ("invalid", "length")]
    if failures:
        print("\nfailures:")
        for r in failures:
            text = r["text"] if len(r["text"]) <= 300 else r["text"][:150] + " ... " + r["text"][-150:]
            print(f"- {r['id']} ({r['status']}, {r['tokens']} tokens): {r['reason']}\n    {text!r}")
    rejected = [r for r in results if r["status"] == "rejected"]
    if rejected:
        print("\nrejected by the grammar compiler (unsupported by the grammar engine):")
        for r in rejected:
            note = f" [corpus gap: {r['gap']}]" if r["gap"] else " [NOT a marked gap]"
            print(f"- {r['id']}{note}: {r['reason'].splitlines()[0]}")
    coverage = collections.Counter(f for e in corpus for f in features(e["schema"]))
    print("\ncoverage (schemas using each feature):")
    print(", ".join(f"{name} {count}" for name, count in sorted(coverage.items())))
    missing = unchecked_formats(corpus)
    if missing:
        print(f"\nWARNING: jsonschema cannot check these formats here (pip install 'jsonschema[format-nongpl]'): "
              f"{', '.join(missing)}")


# -- compile time --------------------------------------------------------------------------------------------------
def compile_times(llm, corpus: list[dict]) -> dict:
    """Per schema: first compile on a fresh grammar cache, then a cache hit, then a matcher copy (ms each)."""
    from glmkit import SamplingParams
    from glmkit.engine.structured import Grammars

    grammars = Grammars(llm.tokenizer, llm.engine.vocab_size)
    start = time.perf_counter()
    grammars._llg()  # the token table, built once per model
    table_ms = (time.perf_counter() - start) * 1000
    first, cached, copies, rejected, first_mask, masks = [], [], [], [], [], []
    for entry in corpus:
        _, params = chat_request(llm, entry, SamplingParams(temperature=0, max_tokens=8))
        t0 = time.perf_counter()
        try:
            grammars.check(params.structured)
        except ValueError as e:
            text = str(e)
            rejected.append((entry["id"], entry.get("gap"), text.split("constrained decoding: ", 1)[-1]))
            continue
        t1 = time.perf_counter()
        grammars.check(params.structured)
        t2 = time.perf_counter()
        matcher = grammars.matcher(params.structured)
        t3 = time.perf_counter()
        grammars.fill([matcher], [frozenset(params.extra_stop_token_ids)])
        t4 = time.perf_counter()
        first.append((t1 - t0) * 1000)
        cached.append((t2 - t1) * 1000)
        copies.append((t3 - t2) * 1000)
        first_mask.append((t4 - t3) * 1000)
        # a few more masks along a valid path: the tokens of a forced prefix are not known here, so consume the
        # first allowed token each time (any token the mask allows keeps the matcher valid)
        for _ in range(4):
            mask = grammars.fill([matcher], [frozenset(params.extra_stop_token_ids)])[0]
            token = _first_allowed(mask)
            if token is None or token in params.extra_stop_token_ids or not matcher.consume_token(token):
                break
            t5 = time.perf_counter()
            grammars.fill([matcher], [frozenset(params.extra_stop_token_ids)])
            masks.append((time.perf_counter() - t5) * 1000)
    return {"token_table_ms": table_ms, "first": first, "cached": cached, "copy": copies, "rejected": rejected,
            "first_mask": first_mask, "mask": masks}


def _first_allowed(words) -> int | None:
    for w, value in enumerate(words.tolist()):
        if value:
            value &= 0xFFFFFFFF
            return 32 * w + (value & -value).bit_length() - 1
    return None


def report_compile(times: dict) -> None:
    def row(name, values):
        v = sorted(values)
        p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
        print(f"| {name} | {statistics.median(v):.2f} | {p90:.2f} | {v[-1]:.2f} |")

    print(f"\ntoken table (once per model): {times['token_table_ms']:.0f} ms; schemas compiled: "
          f"{len(times['first'])}, rejected: {len(times['rejected'])}")
    print("\n| grammar work per request | median ms | p90 ms | max ms |\n|---|---:|---:|---:|")
    row("compile, first use", times["first"])
    row("compile, cache hit", times["cached"])
    row("matcher copy (per request)", times["copy"])
    row("first mask of a new grammar", times["first_mask"])
    row("mask, later tokens", times["mask"])
    for name, gap, reason in times["rejected"]:
        note = f"corpus gap: {gap}" if gap else "NOT a marked gap"
        print(f"rejected {name} [{note}]: {reason.splitlines()[0]}")


# -- cost ----------------------------------------------------------------------------------------------------------
class FillTimer:
    """Wraps Grammars.fill to add up the time it takes (the mask of every constrained row before a step)."""

    def __init__(self, grammars):
        self.grammars, self.original = grammars, grammars.fill
        self.seconds, self.calls, self.rows = 0.0, 0, 0

    def __enter__(self):
        def fill(matchers, stop_ids):
            start = time.perf_counter()
            try:
                return self.original(matchers, stop_ids)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
                self.rows += len(matchers)

        self.grammars.fill = fill
        return self

    def __exit__(self, *exc):
        del self.grammars.fill  # back to the class's method


def cost_requests(llm, corpus: list[dict], count: int, max_tokens: int, constrained: bool):
    from glmkit import SamplingParams

    picks = [e for e in corpus if e.get("variant") == "strict"] or [e for e in corpus if not e.get("gap")]
    picks = [picks[k % len(picks)] for k in range(count)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return [chat_request(llm, e, params, constrained) for e in picks]


def timed_run(llm, requests, concurrency: int) -> tuple[int, float, collections.Counter]:
    """Run the requests `concurrency` at a time; (generated tokens, seconds, finish reasons)."""
    tokens, reasons, start = 0, collections.Counter(), time.perf_counter()
    for first in range(0, len(requests), concurrency):
        chunk = requests[first:first + concurrency]
        for out in llm._run([p.prompt_ids for p, _ in chunk], [params for _, params in chunk]):
            tokens += len(out.outputs[0].token_ids)
            reasons[out.outputs[0].finish_reason] += 1
    return tokens, time.perf_counter() - start, reasons


def run_cost(llm, corpus: list[dict], levels: list[int], repeats: int, max_tokens: int, single_requests: int) -> None:
    print("\ncost: constrained (A, each request with its schema) vs unconstrained (B, same prompts)", flush=True)
    table = []
    for level in levels:
        count = level if level > 1 else single_requests
        sides = {"A constrained": cost_requests(llm, corpus, count, max_tokens, True),
                 "B unconstrained": cost_requests(llm, corpus, count, max_tokens, False)}
        for requests in sides.values():  # warm-up: prefix cache, compiled grammars, first-call allocations
            timed_run(llm, requests, level)
        rates = {side: [] for side in sides}
        counts = {side: collections.Counter() for side in sides}
        reasons = {side: collections.Counter() for side in sides}
        fill = None
        for r in range(repeats):
            for side, requests in sides.items():
                if side.startswith("A"):
                    with FillTimer(llm.engine.grammars) as timer:
                        tokens, seconds, why = timed_run(llm, requests, level)
                    fill = fill or collections.Counter()
                    fill.update({"seconds": timer.seconds, "calls": timer.calls, "rows": timer.rows,
                                 "wall": seconds})
                else:
                    tokens, seconds, why = timed_run(llm, requests, level)
                rates[side].append(tokens / seconds)
                counts[side][tokens] += 1
                reasons[side].update(why)
            print(f"  concurrency {level} repeat {r + 1}/{repeats}: "
                  + "  ".join(f"{side} {v[-1]:.2f} tok/s" for side, v in rates.items()), flush=True)
        table.append((level, count, rates, counts, reasons, fill))

    print(f"\nmax_tokens: {max_tokens}  repeats: {repeats}  (tokens/s = generated tokens / wall time; medians)\n")
    print("| concurrent | requests | constrained tok/s | unconstrained tok/s | ratio | tokens per run A / B | "
          "finish reasons A / B | fill ms per step | fill us per row | fill share of wall |")
    print("|---:|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for level, count, rates, counts, reasons, fill in table:
        a, b = (statistics.median(v) for v in rates.values())
        (ca, cb), (ra, rb) = counts.values(), reasons.values()
        fmt = lambda c: ",".join(str(k) for k in sorted(c))  # noqa: E731
        why = lambda c: " ".join(f"{k}:{v}" for k, v in sorted(c.items()))  # noqa: E731
        per_step = fill["seconds"] / max(fill["calls"], 1) * 1000
        per_row = fill["seconds"] / max(fill["rows"], 1) * 1e6
        print(f"| {level} | {count} | {a:.2f} | {b:.2f} | {a / b:.3f} | {fmt(ca)} / {fmt(cb)} | {why(ra)} / {why(rb)} "
              f"| {per_step:.2f} | {per_row:.0f} | {fill['seconds'] / fill['wall']:.1%} |")


# -- main ----------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_argument_group("what to run (one or more)")
    modes.add_argument("--conformance", action="store_true")
    modes.add_argument("--cost", action="store_true")
    modes.add_argument("--compile", action="store_true", help="compile every schema; no generation")
    parser.add_argument("--model", default=None, help="a model directory or .gguf (default: the embedded model)")
    parser.add_argument("--schemas", type=Path, default=SCHEMAS)
    parser.add_argument("--limit", type=int, default=None, help="only the first N schemas")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1000, help="conformance: conversations per engine run (the "
                        "engine runs up to max_num_seqs of them at once)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the engine's concurrent sequences")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="conformance: 384 (room for every answer); cost: 48 (every answer longer)")
    parser.add_argument("--out", type=Path, default=None, help="conformance: write every result (JSON) here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--single-requests", type=int, default=2,
                        help="cost: requests run one after another at concurrency 1")
    args = parser.parse_args()
    if not (args.conformance or args.cost or args.compile):
        parser.error("say what to run: --conformance, --cost and/or --compile")

    from glmkit import LLM

    corpus = load_corpus(args.schemas, args.limit)
    start = time.perf_counter()
    llm = LLM(args.model, num_threads=args.threads, max_num_seqs=args.max_num_seqs)
    print(f"model: {llm.model_config.name or llm.model_dir}  device: {llm.device}  dtype: {llm.dtype}  "
          f"quantization: {llm.quantization.mode if llm.quantization else 'none'}  "
          f"threads: {llm.resolved_config.num_threads}  loaded in {time.perf_counter() - start:.0f} s  "
          f"schemas: {len(corpus)}", flush=True)
    if args.compile or args.cost:
        report_compile(compile_times(llm, corpus))
    if args.conformance:
        max_tokens = args.max_tokens or 384
        results = run_conformance(llm, corpus, max_tokens, args.batch)
        report_conformance(corpus, results, max_tokens)
        if args.out:
            args.out.write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    if args.cost:
        run_cost(llm, corpus, args.concurrency, args.repeats, args.max_tokens or 48, args.single_requests)


if __name__ == "__main__":
    main()
