"""Perplexity of the default model on a fixed text: fp32 (reference), bf16, int8, int8a8 and int4, and each one's
delta.

    python benchmarks/perplexity.py [--model PATH] [--text benchmarks/data/perplexity.txt] [--window 512]
        [--max-windows N] [--modes fp32 bf16 int8 int8a8 int8a8-fbgemm int8a8-cuda int4] [--threads 2]

The text (English technical prose, Python functions with docstrings, a Chinese paragraph; about 1,800 tokens) is
cut into non-overlapping windows of `--window` tokens; each window is one fresh causal pass through the model, and
every token after the first of its window is scored. Perplexity is exp(mean negative log-likelihood) over all
scored tokens. The delta column is relative to fp32 measured in the same run (fp32 must be among the modes for it).

Each mode loads the model once, then frees it before the next, so at most one copy is in memory. Note: the
embedded default model is a Q4_K_M GGUF, so "fp32" means those weights dequantized to fp32; int8/int4 quantize
that again at load time (activations bf16). int8a8 is int8 with int8 activations quantized per token on glmkit's
own kernel (as benchmarks/cpu_decode.py runs it; glmkit/models/cpu_int8.py), qkv's in two 8-bit halves;
int8a8-fbgemm the same on fbgemm's product, qkv at bf16 activations. int8a8-cuda is what int8a8 computes on a
GPU (kernels/int8_matmul.py), emulated here on the CPU: the int8 weights' W8A16 product, each linear's input
first rounded as that kernel rounds it (per row, mid + step * a with a in [-127, 127]; qkv's in two halves).
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path

import torch

from glmkit import LLM
from glmkit.models.cpu_int8 import using_kernel
from glmkit.models.layers import AttentionBatch, SeqSlice
from glmkit.models.quant import REFINED_INPUTS, QuantLinear

DEFAULT_TEXT = Path(__file__).parent / "data" / "perplexity.txt"
MODES = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"),
         "int8": ("bfloat16", "int8"), "int8a8": ("bfloat16", "int8a8"), "int8a8-fbgemm": ("bfloat16", "int8a8"),
         "int8a8-cuda": ("bfloat16", "int8"), "int4": ("bfloat16", "int4")}
KERNELS = {"int8a8-fbgemm": ("fbgemm", None)}  # int8a8 on fbgemm's product rather than glmkit's own kernel


def round_rows(x: torch.Tensor, halves: int) -> torch.Tensor:
    """x with each row rounded as kernels/int8_matmul.py does: mid + step * a over the row's range, a in
    [-127, 127] rounded half up; with two halves the rounding error is rounded the same way and added back."""
    left, total = x.float(), torch.zeros(x.shape, dtype=torch.float32)
    for _ in range(halves):
        hi, lo = left.amax(-1, keepdim=True), left.amin(-1, keepdim=True)
        mid, step = (hi + lo) * 0.5, (hi - lo) / 254
        inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
        part = mid + (torch.floor((left - mid) * inv + 128.5) - 128) * step
        total, left = total + part, left - part
    return total.to(x.dtype)


def emulate_cuda_int8a8(llm: LLM) -> None:
    """Round the input of every int8 linear as int8a8 does on CUDA (two halves for REFINED_INPUTS)."""
    for name, module in llm.model.named_modules():
        if isinstance(module, QuantLinear) and module.bits == 8:
            halves = 2 if name.endswith(REFINED_INPUTS) else 1
            module._forward = (lambda inner, h: lambda x: inner(round_rows(x, h)))(module._forward, halves)


def window_nll(llm: LLM, ids: list[int], logit_rows: int = 128) -> tuple[float, int]:
    """Sum of -log p(ids[i] | ids[:i]) for i >= 1 over one causal pass, and the number of tokens scored."""
    model, mc = llm.model, llm.model_config
    length = len(ids)
    input_ids = torch.tensor(ids, dtype=torch.long, device=llm.device)
    positions = torch.arange(length, device=llm.device)
    batch = AttentionBatch(slot_mapping=positions, seqs=[SeqSlice(0, length, None)])
    shape = (length, mc.num_kv_heads, mc.head_dim)
    kv_caches = [(torch.zeros(shape, dtype=llm.dtype, device=llm.device),
                  torch.zeros(shape, dtype=llm.dtype, device=llm.device)) for _ in range(mc.num_layers)]
    hidden = model(input_ids, positions, batch, kv_caches)[:-1]  # the last position predicts nothing here
    targets = input_ids[1:]
    total = 0.0
    for start in range(0, length - 1, logit_rows):  # [rows, vocab] fp32 logits a slice at a time
        logits = model.compute_logits(hidden[start:start + logit_rows])
        logp = torch.log_softmax(logits, dim=-1)
        total -= logp.gather(1, targets[start:start + logit_rows, None]).sum().item()
    return total, length - 1


def perplexity(llm: LLM, ids: list[int], window: int, max_windows: int | None) -> tuple[float, int]:
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2][:max_windows]
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            s, n = window_nll(llm, w)
            nll, count = nll + s, count + n
    return math.exp(nll / count), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory or .gguf (default: the embedded model)")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--window", type=int, default=512, help="tokens per causal pass")
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")

    results: dict[str, tuple[float, int, float]] = {}
    ids: list[int] | None = None
    for mode in args.modes:
        dtype, quantization = MODES[mode]
        start = time.perf_counter()
        with using_kernel(*KERNELS.get(mode, (None, None))):
            llm = LLM(args.model, dtype=dtype, quantization=quantization, num_threads=args.threads,
                      kv_cache_memory_gb=0.05, enable_prefix_caching=False)
        if mode == "int8a8-cuda":
            emulate_cuda_int8a8(llm)
        loaded = time.perf_counter() - start
        if ids is None:
            ids = llm.encode_prompt(text)
            print(f"model: {llm.model_config.name or llm.model_dir}  text: {args.text} ({len(ids)} tokens)  "
                  f"window: {args.window}  threads: {args.threads}")
        start = time.perf_counter()
        ppl, count = perplexity(llm, ids, args.window, args.max_windows)
        scored = time.perf_counter() - start
        results[mode] = (ppl, count, scored)
        print(f"  {mode}: ppl {ppl:.4f} over {count} tokens (load {loaded:.1f} s, score {scored:.1f} s)", flush=True)
        del llm
        gc.collect()

    base = results.get("fp32")
    print()
    print("| mode | perplexity | vs fp32 | tokens scored | scoring time (s) |")
    print("|------|-----------:|--------:|--------------:|-----------------:|")
    for mode, (ppl, count, scored) in results.items():
        delta = f"{(ppl / base[0] - 1) * 100:+.2f}%" if base else "n/a"
        print(f"| {mode} | {ppl:.4f} | {delta} | {count} | {scored:.1f} |")


if __name__ == "__main__":
    main()
