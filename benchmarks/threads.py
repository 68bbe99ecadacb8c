"""CPU decode speed by thread count, with and without other work on the machine: what `--threads` should default to.

    python benchmarks/threads.py [--threads 1 2] [--busy 0 1] [--tokens 64] [--repeats 3] [--model PATH]

Each configuration (threads x busy processes x OpenMP wait policy) runs in a fresh process (the wait policy is
read when torch loads) that loads the model (default: the embedded one, in its default mode) and times a greedy
decode of --tokens tokens after a warm-up, as benchmarks/cpu_decode.py does. "busy" processes are pure-Python
spin loops started beside it, standing in for anything else using the CPU (another model, a build, a browser).
Configurations run interleaved, --repeats times, and the table gives the median tokens/s of each, plus each
one's ratio to the best configuration under the same load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
from glmkit import LLM, SamplingParams
model, threads, tokens = (sys.argv[1] or None), int(sys.argv[2]), int(sys.argv[3])
llm = LLM(model, num_threads=threads, max_num_seqs=1)
prompt = llm.render_chat([{"role": "user", "content": "Write a Python function that parses a CSV file."}])
def timed(n):
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    return time.perf_counter() - start
timed(8)  # warm-up
first = timed(1)
print(json.dumps({"tok_s": tokens / (timed(tokens + 1) - first)}))
"""


def run_one(model: str, threads: int, busy: int, policy: str, tokens: int) -> float:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        env = dict(os.environ)
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        out = subprocess.run([sys.executable, "-c", CHILD, model, str(threads), str(tokens)], env=env,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["tok_s"]
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, max(cores - 1, 1), cores}))
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--policy", nargs="+", default=["default", "PASSIVE"], help="OMP_WAIT_POLICY values")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="", help="model directory or .gguf (default: the embedded model)")
    args = parser.parse_args()
    configs = list(itertools.product(args.busy, args.threads, args.policy))
    rates: dict[tuple, list[float]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for busy, threads, policy in configs:
            rate = run_one(args.model, threads, busy, policy, args.tokens)
            rates[(busy, threads, policy)].append(rate)
            print(f"repeat {repeat + 1}: busy={busy} threads={threads} OMP_WAIT_POLICY={policy}: {rate:.1f} tok/s",
                  file=sys.stderr)
    print(f"{cores} CPUs; decode of {args.tokens} tokens, median of {args.repeats}")
    print("| busy processes | threads | OMP_WAIT_POLICY | tok/s | x best under this load |")
    print("|---|---|---|---|---|")
    for busy in args.busy:
        medians = {c: statistics.median(r) for c, r in rates.items() if c[0] == busy}
        best = max(medians.values())
        for (_, threads, policy), rate in medians.items():
            print(f"| {busy} | {threads} | {policy} | {rate:.1f} | {rate / best:.2f} |")


if __name__ == "__main__":
    main()
