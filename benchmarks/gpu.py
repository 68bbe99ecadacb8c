"""GPU speed of glmkit against Hugging Face transformers, in one run, on a random-weight model of a real shape.

    python benchmarks/gpu.py [--shape chatglm3-6b|glm4-9b] [--concurrency 1 16 64 256] [--skip-hf]
        [--quantization none|int8|int8a8|int4] [--memory-8k [MODE ...]]

Builds (once, under --work-dir) a GLM checkpoint in the transformers-native layout with random bf16 weights
and a word-level tokenizer covering every id, then measures on the same GPU in this process:
  - the memory bandwidth (the larger of a 1 GiB device copy and a 1 GiB sum), and from it the decode limit at
    batch 1: bytes of weights read per token (everything but the embedding table) / bandwidth;
  - HF transformers: `generate` at batch 1 (decode tok/s) and `generate_batch` (its continuous batching) at
    the highest concurrency; glmkit: decode tok/s at batch 1 and its fraction of the limit, output tok/s at each
    concurrency (prompt 128, output 256 tokens, EOS ignored; median of 3 after a warm-up round), time to first
    token of a 2,048-token prompt (also with 1,920 of its tokens in the prefix cache, as a chat's next turn),
    and peak GPU memory.
With --memory-8k MODE ... it also loads the model with each quantization mode (none, int8, int4) in a process of
its own and reports, with an 8k-token context: the GPU memory peak while loading and while serving
(torch.cuda.max_memory_allocated), decode speed, and the process's peak RSS (issue: int4 <= 5.5 GB for the
ChatGLM3-6B shape from start to finish).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import statistics
import time
from pathlib import Path

import torch

SHAPES = {  # transformers GlmConfig fields
    "chatglm3-6b": dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
                        num_attention_heads=32, num_key_value_heads=2, head_dim=128),
    "glm4-9b": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                    num_attention_heads=32, num_key_value_heads=2, head_dim=128),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def build_checkpoint(shape: str, work_dir: Path, device: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GlmConfig, GlmForCausalLM

    out = work_dir / f"random-{shape}"
    if (out / "config.json").is_file():
        return out
    config = GlmConfig(**SHAPES[shape], partial_rotary_factor=0.5, attention_bias=True, max_position_embeddings=8192,
                       torch_dtype="bfloat16", eos_token_id=[0], pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = GlmForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}", "eos_token": "t0"}))
    model = None  # free it before the next measurement
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bandwidth_gbs() -> tuple[float, float]:
    """(copy, read) GB/s over 1 GiB, median of 10 rounds timed by CUDA events: a device copy (bytes read + written)
    and a sum (bytes read). Decoding reads weights, so the larger of the two bounds it."""
    x = torch.zeros(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)

    def timed(fn) -> float:
        fn()
        rounds = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) / 5 / 1e3)
        return statistics.median(rounds)

    copy = 2 * 2**30 / timed(lambda: y.copy_(x)) / 1e9
    read = 2**30 / timed(lambda: x.sum()) / 1e9
    del x, y
    return copy, read


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def hf_baseline(model_dir: Path, batch: int, vocab: int, prompt_len: int, output_len: int) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    res = {}
    ids = torch.tensor(prompts(1, prompt_len, vocab, 1), device="cuda")

    def timed(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t

    timed(4)
    first, full = timed(1), timed(output_len)
    res["decode_b1"] = (output_len - 1) / (full - first)
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    batch_prompts = prompts(batch, prompt_len, vocab, 2)
    model.generate_batch(inputs=batch_prompts[:8], generation_config=config)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    outputs = model.generate_batch(inputs=batch_prompts, generation_config=config)
    torch.cuda.synchronize()
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    res[f"throughput_{batch}"] = generated / (time.perf_counter() - t)
    model = None  # free it before the next measurement
    gc.collect()
    torch.cuda.empty_cache()
    return res


def glmkit_runs(model_dir: Path, concurrency: list[int], vocab: int, prompt_len: int, output_len: int,
                quantization: str, kv_gb: float, profile: bool = False) -> dict:
    from glmkit import LLM, SamplingParams

    torch.cuda.reset_peak_memory_stats()
    llm = LLM(str(model_dir), dtype="bfloat16", chat_format="jinja", max_num_seqs=max(concurrency),
              max_model_len=4096, kv_cache_memory_gb=kv_gb, quantization=quantization)
    res = {"load_peak_gb": torch.cuda.max_memory_allocated() / 1e9, "loaded_gb": torch.cuda.memory_allocated() / 1e9}

    def run(batch, n, seed):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts(batch, prompt_len, vocab, seed), params)
        torch.cuda.synchronize()
        assert sum(len(o.outputs[0].token_ids) for o in outs) == batch * n
        return time.perf_counter() - t

    run(2, 8, 100)  # warm-up
    firsts = [run(1, 1, 200 + i) for i in range(3)]
    fulls = [run(1, output_len, 300 + i) for i in range(3)]
    res["decode_b1"] = (output_len - 1) / (statistics.median(fulls) - statistics.median(firsts))
    for c in concurrency:  # a warm-up round (the first steps at a new batch size tune kernels), then 3 timed
        run(c, output_len, 900 + c)
        res[f"throughput_{c}"] = c * output_len / statistics.median(run(c, output_len, 1000 + c + 7 * i)
                                                                    for i in range(3))
    long_prompts = prompts(6, 2048, vocab, 7)
    ttfts = []
    for p in long_prompts:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([p], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        ttfts.append(time.perf_counter() - t)
    res["ttft_2k_ms"] = statistics.median(ttfts[1:]) * 1e3
    # A follow-up turn: 1,920 tokens of the prompt are in the prefix cache, 128 are new and attend to them
    # through the paged prefill kernel.
    history = prompts(1, 1920, vocab, 8)[0]
    follow_ups = [history + p for p in prompts(6, 128, vocab, 9)]
    once = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    llm.generate([history + [1]], once)
    ttfts = []
    for p in follow_ups:
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate([p], once)
        ttfts.append(time.perf_counter() - t)
    res["ttft_2k_cached_ms"] = statistics.median(ttfts[1:]) * 1e3
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    graphs = llm.engine.runner.graphs
    if graphs is not None:  # the GPU time of one decode step alone, without the engine around it
        graph = graphs.graphs[1][0]
        graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        res["replay_b1_ms"] = (time.perf_counter() - t) / 50 * 1e3
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(run, max(concurrency), 64, 5000)
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    llm = None  # free it before the next measurement
    gc.collect()
    torch.cuda.empty_cache()
    return res


def memory_8k(model_dir: Path, vocab: int, quantization: str) -> dict:
    """Peak GPU memory and decode speed with a 8,192-token context (prompt 7,936 + 256 generated)."""
    from glmkit import LLM, SamplingParams

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    llm = LLM(str(model_dir), chat_format="jinja", max_num_seqs=1, max_model_len=8192,
              kv_cache_memory_gb=8192 * llm_kv_bytes(model_dir) / 2**30, quantization=quantization)
    loaded, load_peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    prompt = prompts(1, 8192 - 256, vocab, 9)[0]
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    elapsed = []
    for i in (1, 2):  # the first round also compiles the kernels for the short prefill shapes: time the second
        t = time.perf_counter()
        llm.generate([prompt[:-1] + [(prompt[-1] + i) % (vocab - 1) + 1]], params)  # mostly a prefix-cache hit
        elapsed.append(time.perf_counter() - t)
    elapsed = elapsed[-1]
    res = {"peak_gb": (torch.cuda.max_memory_allocated() - base) / 1e9, "decode_8k": 256 / elapsed,
           "loaded_gb": loaded / 1e9, "load_peak_gb": load_peak / 1e9,
           "rss_peak_gb": rss_peak_gb()}
    llm = None  # free it before the next measurement
    gc.collect()
    torch.cuda.empty_cache()
    return res


def rss_peak_gb() -> float:
    """This process's peak resident memory (VmHWM: getrusage's ru_maxrss would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def llm_kv_bytes(model_dir: Path) -> int:
    c = json.loads((model_dir / "config.json").read_text())
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="chatglm3-6b")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--quantization", default="none", choices=("none", "int8", "int8a8", "int4"))
    parser.add_argument("--kv-cache-memory", type=float, default=8.0, help="GiB for glmkit's KV pool")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile the engine at the highest concurrency")
    parser.add_argument("--memory-8k", nargs="*", default=None, metavar="MODE",
                        help="also measure peak memory at 8k context for these modes (e.g. none int8 int4)")
    parser.add_argument("--work-dir", default="/tmp/glmkit-bench")
    parser.add_argument("--child-8k", help=argparse.SUPPRESS)  # one --memory-8k mode, in a fresh process
    args = parser.parse_args()

    model_dir = build_checkpoint(args.shape, Path(args.work_dir), "cuda")
    if args.child_8k:
        print(json.dumps(memory_8k(model_dir, json.loads((model_dir / "config.json").read_text())["vocab_size"],
                                   args.child_8k)))
        return
    config = json.loads((model_dir / "config.json").read_text())
    vocab = config["vocab_size"]
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    read_per_token = weights - vocab * config["hidden_size"] * 2  # the embedding table is looked up, not read
    copy_bw, read_bw = bandwidth_gbs()
    bw = max(copy_bw, read_bw)
    limit = bw * 1e9 / read_per_token
    print(f"# {torch.cuda.get_device_name()}, {args.shape} (random bf16 weights, {weights / 1e9:.2f} GB), "
          f"torch {torch.__version__}")
    print(f"bandwidth: copy {copy_bw:.0f} GB/s, read {read_bw:.0f} GB/s; "
          f"weights read per token: {read_per_token / 1e9:.2f} GB; "
          f"batch-1 decode limit: {limit:.0f} tok/s")
    ours = glmkit_runs(model_dir, args.concurrency, vocab, args.prompt_len, args.output_len, args.quantization,
                       args.kv_cache_memory, args.profile)
    theirs = {} if args.skip_hf else hf_baseline(model_dir, max(args.concurrency), vocab, args.prompt_len,
                                                 args.output_len)
    print("\n| measure | glmkit | HF transformers | glmkit / HF |\n|---|---|---|---|")
    rows = [("decode tok/s, batch 1", "decode_b1")] + [
        (f"output tok/s, {c} concurrent", f"throughput_{c}") for c in args.concurrency]
    for label, key in rows:
        mine, base = ours.get(key), theirs.get(key)
        print(f"| {label} | {mine:.1f} | {f'{base:.1f}' if base else '-'} | "
              f"{f'{mine / base:.2f}x' if base else '-'} |")
    print(f"\nglmkit batch-1 decode = {ours['decode_b1'] / limit:.0%} of the bandwidth limit ({limit:.0f} tok/s)")
    print(f"glmkit time to first token, 2,048-token prompt: {ours['ttft_2k_ms']:.1f} ms (median of 5); "
          f"with its first 1,920 tokens in the prefix cache: {ours['ttft_2k_cached_ms']:.1f} ms")
    print(f"glmkit peak GPU memory: {ours['peak_gb']:.2f} GB (weights + {args.kv_cache_memory} GiB KV pool "
          f"+ graphs); in use after loading: {ours['loaded_gb']:.2f} GB (peak while loading "
          f"{ours['load_peak_gb']:.2f} GB)")
    if "replay_b1_ms" in ours:
        print(f"batch-1 decode step: {1e3 / ours['decode_b1']:.2f} ms in the engine, of which the CUDA graph "
              f"replay alone takes {ours['replay_b1_ms']:.2f} ms")
    for mode in args.memory_8k or []:
        # A process of its own per mode: its peak RSS and GPU peaks are that mode's alone, from start to finish.
        child = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--work-dir", args.work_dir,
                                "--child-8k", mode], capture_output=True, text=True, check=True)
        m = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"8k context, {mode}: peak {m['peak_gb']:.2f} GB while serving (weights and KV pool "
              f"{m['loaded_gb']:.2f} GB; peak while quantizing/loading {m['load_peak_gb']:.2f} GB), "
              f"decode {m['decode_8k']:.1f} tok/s; the process's peak RSS {m['rss_peak_gb']:.2f} GB")


if __name__ == "__main__":
    main()
