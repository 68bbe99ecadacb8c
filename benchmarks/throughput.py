"""Output tokens/s of the engine at 1, 4, 8, 16 concurrent requests, and the ratio to one stream.

    python benchmarks/throughput.py [--model PATH] [--dtype auto|bfloat16]
        [--quantization auto|none|int8|int8a8|int4] [--threads N] [--concurrency 1 4 8 16] [--max-tokens 128]
        [--repeats 3]

Each level runs `repeats` times in this process and prints the median; the ratio column divides by the median
of the single-stream run measured in the same process, so machine noise affects both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

from glmkit import LLM, SamplingParams

QUESTIONS = ["Write a Python function that reverses a string.", "用Python写一个快速排序。",
             "Explain what a hash map is.", "什么是递归？请举例说明。", "Write a SQL query that counts users per city.",
             "How do I read a file line by line in Java?", "解释一下 TCP 三次握手。", "What does `git rebase` do?"]


def run_level(llm: LLM, concurrency: int, max_tokens: int) -> float:
    # Chat-formatted prompts, sent as token ids so that ignore_eos also ignores the format's stop tokens.
    prompts = [llm.render_chat([{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}])
               for i in range(concurrency)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outputs)
    assert generated == concurrency * max_tokens, generated
    return generated / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float32")
    parser.add_argument("--quantization", default="auto", help="auto (the default model on a CPU: int8a8 with "
                        "AVX2, int8 with bf16 instructions alone, else none), none, int8, int8a8, int4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, num_threads=args.threads)
    run_level(llm, 2, 8)  # warm-up: first-call allocations and kernels
    medians = {}
    print(f"model: {llm.model_config.name or llm.model_dir}  device: {llm.device}  dtype: {llm.dtype}  "
          f"quantization: {llm.quantization.mode if llm.quantization else 'none'}  "
          f"max_tokens: {args.max_tokens}  repeats: {args.repeats}")
    print(f"{'concurrent':>10} {'output tok/s (median)':>22} {'runs':>26} {'x one stream':>13}")
    for level in args.concurrency:
        runs = [run_level(llm, level, args.max_tokens) for _ in range(args.repeats)]
        medians[level] = statistics.median(runs)
        base = medians.get(1) or medians[args.concurrency[0]]
        print(f"{level:>10} {medians[level]:>22.1f} {' '.join(f'{r:.1f}' for r in runs):>26} "
              f"{medians[level] / base:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
