"""`glmkit eval`: score a model (optionally with a LoRA adapter) on a dev set of conversations:
`glmkit eval --model DIR --adapter OUT --data dev.jsonl` prints ROUGE-1/2/L and BLEU-4 as ChatGLM3's
finetune_demo computes them (BLEU-4 on its 0-1 scale), and the generation speed; --output keeps every sample.

Knows argparse, the data reader and finetune/evaluate.py; nothing of the engine. torch, the model and the
scoring libraries load only in main(), after the flags and the data file have been checked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .args import add_model_arguments, engine_kwargs, existing_path, integer, use_one_adapter

DEFAULT_MAX_TOKENS = 512  # the official finetune_demo's generation max_new_tokens (configs/*.yaml)


def _output(text: str) -> str:
    """A file to (over)write: its folder must exist now, not after minutes of generating."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"--output={text!r}: is a directory; give a file name such as "
                                         f"{path / 'eval.jsonl'}")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"--output={text!r}: its folder {str(path.parent)!r} does not exist; "
                                         "create it first or choose another path")
    return text


def add_arguments(p) -> None:
    add_model_arguments(p)
    g = p.add_argument_group("evaluation")
    g.add_argument("--data", required=True, metavar="FILE", help="dev set: .jsonl or .json conversations; each "
                   "one's last assistant turn is the reference", type=existing_path(
                       "--data", "pass a .jsonl or .json file of conversations"))
    g.add_argument("--max-tokens", default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"tokens per answer (default {DEFAULT_MAX_TOKENS}, as the official finetune demo)",
                   type=integer("--max-tokens", 1, fix=f"e.g. --max-tokens {DEFAULT_MAX_TOKENS}"))
    g.add_argument("--limit", default=None, metavar="N", help="evaluate only the first N conversations",
                   type=integer("--limit", 1, fix="omit it to evaluate every conversation"))
    g.add_argument("--output", default=None, metavar="FILE.jsonl", type=_output,
                   help="write one JSON line per sample: source, prompt, reference, prediction, its scores")
    g.add_argument("--json", action="store_true", help="print the scores as one JSON object instead of a table")


def _load_llm(args):
    from ..llm import LLM

    # --adapter is a model flag (commands/args.py). --threads unset: torch's default, every core: this is a batch
    # job like serve, not one conversation beside other work.
    llm = LLM(args.model, **engine_kwargs(args))
    use_one_adapter(llm, args.adapter)
    return llm


def _write_rows(path: str, rows) -> None:
    with open(Path(path).expanduser(), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.as_dict(), ensure_ascii=False) + "\n")


def _table(scores, rows, generation_s: float) -> str:
    num_tokens = sum(r.num_output_tokens for r in rows)
    lines = [f"samples   {scores.num_samples:>9}",
             f"ROUGE-1   {scores.rouge_1:>9.4f}",
             f"ROUGE-2   {scores.rouge_2:>9.4f}",
             f"ROUGE-L   {scores.rouge_l:>9.4f}",
             f"BLEU-4    {scores.bleu_4:>9.4f}  (0-1, as ChatGLM3's finetune_demo reports it; ROUGE is x100)",
             f"tokens/s  {num_tokens / max(generation_s, 1e-9):>9.1f}  ({num_tokens} tokens in {generation_s:.1f} s)"]
    if scores.num_empty:
        lines.append(f"empty     {scores.num_empty:>9}  (an empty answer or reference scores 0)")
    cut = sum(r.finish_reason == "length" for r in rows)
    if cut:
        lines.append(f"cut short {cut:>9}  (reached --max-tokens; raise it if answers are longer)")
    return "\n".join(lines)


def main(args) -> int:
    from ..finetune import metrics
    from ..finetune.data import read_conversations
    from ..finetune.evaluate import eval_sample, generate_answers, score_answers

    # The data and the scoring libraries are checked before the model loads: a mistake costs seconds.
    conversations = read_conversations(args.data)[:args.limit]
    samples = [eval_sample(c) for c in conversations]
    metrics.require()
    llm = _load_llm(args)
    start = time.perf_counter()
    answers = generate_answers(llm, samples, args.max_tokens)
    generation_s = time.perf_counter() - start
    scores, rows = score_answers(samples, answers)
    if args.output:
        _write_rows(args.output, rows)
    num_tokens = sum(r.num_output_tokens for r in rows)
    if args.json:
        print(json.dumps({**scores.as_dict(), "num_output_tokens": num_tokens, "generation_s": round(generation_s, 3),
                          "tokens_per_s": round(num_tokens / max(generation_s, 1e-9), 2)}, ensure_ascii=False))
    else:
        print(_table(scores, rows, generation_s))
    if args.output:
        print(f"wrote {len(rows)} samples to {args.output}", file=sys.stderr)
    return 0
