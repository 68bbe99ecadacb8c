"""Output tokens/s of the engine at 1, 4, 8, 16 concurrent requests, and the ratio to one stream.

    python benchmarks/throughput.py [--model PATH] [--dtype auto|bfloat16]
        [--quantization auto|none|int8|int8a8|int4] [--threads N] [--concurrency 1 4 8 16] [--max-tokens 128]
        [--repeats 3]

The levels run interleaved (1, 4, 8, 16, 1, 4, ...) `repeats` times in this process, so machine noise hits them
alike; each level prints its median, and the ratio column the median over repeats of (this level / the first
level in the same round), pair by pair.
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
    print(f"model: {llm.model_config.name or llm.model_dir}  device: {llm.device}  dtype: {llm.dtype}  "
          f"quantization: {llm.quantization.mode if llm.quantization else 'none'}  "
          f"max_tokens: {args.max_tokens}  repeats: {args.repeats}")
    runs: dict[int, list[float]] = {level: [] for level in args.concurrency}
    for repeat in range(args.repeats):
        for level in args.concurrency:
            runs[level].append(run_level(llm, level, args.max_tokens))
        print(f"round {repeat + 1}/{args.repeats}: " + "  ".join(f"{level}: {r[-1]:.1f}" for level, r in runs.items()),
              flush=True)
    base = runs[args.concurrency[0]]
    print(f"{'concurrent':>10} {'output tok/s (median)':>22} {'runs':>32} {'x first level':>14}")
    for level, r in runs.items():
        ratio = statistics.median(a / b for a, b in zip(r, base))
        print(f"{level:>10} {statistics.median(r):>22.1f} {' '.join(f'{x:.1f}' for x in r):>32} {ratio:>13.2f}x")


if __name__ == "__main__":
    main()
