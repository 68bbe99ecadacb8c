"""Single-stream CPU decode tokens/s of the default model: glmkit fp32, bf16, int8, int8a8, int4, and llama.cpp.

    python benchmarks/cpu_decode.py [--threads 2] [--tokens 128] [--repeats 3]
        [--modes fp32 bf16 int8 int8a8 int8a8-avx2 int8a8-fbgemm int8a8-torch-ops int4 llama.cpp] [--model PATH.gguf]

int8 runs the int8 weights with bf16 activations (PyTorch's `_weight_int8pack_mm`); int8a8 the same weights with
int8 activations quantized per token on glmkit's own kernel (glmkit/models/cpu_int8.py, kernels/cpu_int8.c) on
the widest instruction set the CPU has, qkv's in two 8-bit halves; int8a8-avx2 the same on its AVX2 path (what a
CPU without VNNI runs); int8a8-fbgemm the same weights on fbgemm's dynamic quantized linear (the fallback where
glmkit's kernel was not built; qkv at bf16 activations); int8a8-torch-ops int8a8 with the step's small operations
(RMSNorm, SiLU-and-mul, decode attention) in PyTorch rather than kernels/cpu_decode.c.

Decode rate excludes prompt processing. glmkit: one request for 1 token and one for tokens + 1 from the same
prompt (prefix caching off, so both prefill alike); rate = tokens / (difference of the two times). llama.cpp
(llama-cpp-python, an optional benchmark dependency) runs the same GGUF file with n_threads = --threads; its
`Llama.generate` never stops at EOS, and the clock runs from its first yielded token to the (tokens + 1)-th.
Both get the same prompt token ids (a chat-formatted request rendered by glmkit; the tokenizers are the same).

Every model is loaded once and kept in memory; the modes run interleaved (A B C D A B C D ...) so machine noise
hits all of them, one warm-up run each first. The table gives the median over repeats and the ratio to fp32 and
to llama.cpp measured in the same run. Modes that cannot run are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

from glmkit import LLM, SamplingParams
from glmkit.kernels import cpu_decode
from glmkit.models.cpu_int8 import using_kernel

GLMKIT_MODES = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"),
                "int8": ("bfloat16", "int8"), "int8a8": ("bfloat16", "int8a8"),
                "int8a8-avx2": ("bfloat16", "int8a8"), "int8a8-fbgemm": ("bfloat16", "int8a8"),
                "int8a8-torch-ops": ("bfloat16", "int8a8"), "int4": ("bfloat16", "int4")}
# int8a8 on glmkit's kernel's AVX2 path (what a CPU without VNNI runs), or on fbgemm's product
KERNELS = {"int8a8-avx2": ("glmkit", "avx2"), "int8a8-fbgemm": ("fbgemm", None)}
TORCH_OPS = {"int8a8-torch-ops"}  # the step's small operations in PyTorch, not kernels/cpu_decode.c
LLAMA = "llama.cpp"
PROMPT = ("Write a Python function that reads a CSV file and returns its rows as a list of dictionaries, "
          "with error handling for missing files and malformed lines. Explain each step.")


def glmkit_rate(llm: LLM, prompt: list[int], tokens: int, c_ops: bool = True) -> float:
    def timed(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        out = llm.generate(prompt, params)[0].outputs[0]
        elapsed = time.perf_counter() - start
        assert len(out.token_ids) == n, (len(out.token_ids), n)
        return elapsed

    with cpu_decode.using(c_ops):
        first = timed(1)
        return tokens / (timed(tokens + 1) - first)


def llama_rate(llama, prompt: list[int], tokens: int) -> float:
    llama.reset()
    stream = llama.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
    next(stream)  # prompt processing + first token
    start = time.perf_counter()
    for _ in range(tokens):
        next(stream)
    elapsed = time.perf_counter() - start
    stream.close()
    return tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded default model's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens timed per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=[*GLMKIT_MODES, LLAMA], choices=[*GLMKIT_MODES, LLAMA])
    args = parser.parse_args()
    gguf = args.model or "the default model"

    runners, skipped, prompt = {}, {}, None
    for mode in args.modes:
        if mode == LLAMA:
            continue
        dtype, quantization = GLMKIT_MODES[mode]
        start = time.perf_counter()
        try:
            with using_kernel(*KERNELS.get(mode, (None, None))):
                llm = LLM(args.model, dtype=dtype, quantization=quantization, num_threads=args.threads,
                          kv_cache_memory_gb=0.25, enable_prefix_caching=False)
        except Exception as e:  # e.g. a quantization mode this machine cannot run
            skipped[mode] = f"{type(e).__name__}: {e}"
            continue
        quant = llm.quantization.mode if llm.quantization else "none"
        print(f"loaded glmkit {mode} ({llm.dtype}, quantization {quant}) in {time.perf_counter() - start:.1f} s",
              flush=True)
        if prompt is None:
            prompt = llm.render_chat([{"role": "user", "content": PROMPT}])
        runners[mode] = partial(glmkit_rate, llm, prompt, c_ops=mode not in TORCH_OPS)
    if LLAMA in args.modes:
        try:
            from llama_cpp import Llama
        except ImportError as e:
            skipped[LLAMA] = f"llama_cpp does not import ({e}); pip install llama-cpp-python"
        else:
            if prompt is None:  # no glmkit mode asked for: borrow its tokenizer and chat format for the prompt
                prompt = LLM(args.model, dtype="bfloat16", quantization="none", kv_cache_memory_gb=0.05).render_chat(
                    [{"role": "user", "content": PROMPT}])
            if args.model is None:  # assembled now: converting the default model for glmkit's modes deletes it
                from glmkit.models.default import default_gguf_path

                gguf = str(default_gguf_path())
            start = time.perf_counter()
            llama = Llama(model_path=gguf, n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=max(1024, len(prompt) + args.tokens + 16), verbose=False)
            print(f"loaded llama.cpp in {time.perf_counter() - start:.1f} s", flush=True)
            runners[LLAMA] = partial(llama_rate, llama, prompt)
    if not runners:
        raise SystemExit(f"nothing to run; skipped: {skipped}")

    rates = {mode: [] for mode in runners}
    for run in runners.values():  # warm-up: first-call allocations and kernels
        run(4)
    for r in range(args.repeats):
        for mode, run in runners.items():
            rates[mode].append(run(args.tokens))
        print(f"repeat {r + 1}/{args.repeats}: " + "  ".join(f"{m} {v[-1]:.1f}" for m, v in rates.items()), flush=True)

    medians = {mode: statistics.median(v) for mode, v in rates.items()}
    fp32, ref = medians.get("fp32"), medians.get(LLAMA)
    print(f"\nmodel: {gguf}  threads: {args.threads}  prompt: {len(prompt)} tokens  decoded: {args.tokens}  "
          f"repeats: {args.repeats}\n")
    print("| mode | decode tok/s (median) | runs | vs fp32 | vs llama.cpp |")
    print("|------|----------------------:|------|--------:|-------------:|")
    for mode, med in medians.items():
        runs = " ".join(f"{v:.1f}" for v in rates[mode])
        vs_fp32 = f"{med / fp32:.2f}x" if fp32 else "n/a"
        vs_ref = f"{med / ref:.2f}x" if ref else "n/a"
        print(f"| {mode} | {med:.1f} | {runs} | {vs_fp32} | {vs_ref} |")
    for mode, why in skipped.items():
        print(f"skipped {mode}: {why}")


if __name__ == "__main__":
    main()
