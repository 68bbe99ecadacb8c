"""Decode speed with LoRA adapters served beside the base model, against the base alone, in the same process.

    python benchmarks/adapters.py [--model DIR | --shape chatglm3-6b] [--rank 16] [--adapters 8]
        [--concurrent 1 8] [--tokens 64] [--repeats 3] [--dtype auto] [--quantization auto]

Random LoRA adapters (peft format, written to a temporary directory) of rank --rank on every linear layer are
loaded into one LLM. For each --concurrent N it runs, interleaved --repeats times: N greedy requests on the base
model, then the same N requests spread round-robin over --adapters adapters (with N = 1: one adapter), each
decoding --tokens tokens (ignore_eos), and prints the median output tokens/s of each and the ratio. Both sides
send their requests from one thread per adapter, so they arrive the same way.
--shape builds a random-weight checkpoint of a real model's shape as benchmarks/gpu.py does (on a GPU: the
ChatGLM3-6B shape in bf16). On CUDA the adapters are held in GPU slots sized up front (--max-lora-rank), and the
script reports how many decode steps each set of CUDA graphs ran (with and without the LoRA kernel).

    python benchmarks/adapters.py --kernel [--shape chatglm3-6b] [--rank 16] [--adapters 8]

times the LoRA kernel alone (kernels/lora.py, on a GPU) for one layer's four linears at 1, 8, 16 and 64 rows
spread over the adapters, beside the base layer's own products, each replayed 20 times in a CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from glmkit import LLM  # noqa: E402
from glmkit.engine.sampling_params import SamplingParams  # noqa: E402
from glmkit.models.lora import ADAPTER_CONFIG, PEFT_PREFIX, checkpoint_names, targets_of  # noqa: E402


def write_adapter(out: Path, llm: LLM, rank: int, seed: int) -> Path:
    """A peft LoRA of this rank on every linear layer of llm's checkpoint, with small random A and B."""
    from safetensors.torch import save_file

    targets = targets_of(checkpoint_names(llm.model_dir), llm.model_config, llm.model)
    if not targets:
        raise SystemExit(f"{llm.model_dir} has no float linear weights to adapt; pass --quantization none (a "
                         "quantized base still serves adapters, but this script names them from a float checkpoint)")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, t in targets.items():
        rows = t.rows.stop - t.rows.start
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = torch.randn(rank, t.in_features, generator=g) * 0.01
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    modules = sorted({p.rpartition(".")[2] for p in targets})
    (out / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                  "target_modules": modules}))
    return out


def rate(llm: LLM, n: int, tokens: int, adapters: list[str | None], callers: int) -> float:
    """Output tokens/s of n requests decoding `tokens` each from `callers` threads, request i through
    adapters[i % len(adapters)] (the base and the adapters are sent the same way, so they arrive alike)."""
    import threading

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompts = [f"Request {i}: tell me a long story about the sea." for i in range(n)]
    groups: dict[int, list[str]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(i % min(callers, n), []).append(p)
    start = time.perf_counter()
    threads = [threading.Thread(target=llm.generate, args=(ps, params), kwargs={"adapter": adapters[k % len(adapters)]})
               for k, ps in groups.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n * tokens / (time.perf_counter() - start)


def kernel_times(shape: str, rank: int, slots: int) -> None:
    """Per linear of one layer: the base product and the LoRA update (us), at several row counts."""
    from gpu import SHAPES

    from glmkit.kernels.lora import add_lora, lora_rows

    c, dev, dt = SHAPES[shape], "cuda", torch.bfloat16
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * c["head_dim"]
    linears = {"qkv (q, k, v: 3 targets)": (hidden, qkv, 3 * rank), "o": (hidden, hidden, rank),
               "gate_up": (hidden, 2 * inter, rank), "down": (inter, hidden, rank)}

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 200 * 1000

    print(f"{shape}, {slots} adapters of rank {rank}: us per call, replayed in a CUDA graph")
    print("| rows | linear | base | LoRA update |\n|---:|---|---:|---:|")
    for rows in (1, 8, 16, 64):
        total = [0.0, 0.0]
        for name, (k, n, w) in linears.items():
            x, weight = torch.randn(rows, k, device=dev, dtype=dt), torch.randn(n, k, device=dev, dtype=dt)
            a = torch.randn(slots, w, k, device=dev, dtype=dt) * 0.01
            b = torch.randn(slots, w, n, device=dev, dtype=dt) * 0.01
            y, which = x @ weight.t(), lora_rows([i % slots for i in range(rows)], slots, dev)
            times = timed(lambda: x @ weight.t()), timed(lambda: add_lora(y, x, a, b, which))
            total = [total[0] + times[0], total[1] + times[1]]
            print(f"| {rows} | {name} | {times[0]:.1f} | {times[1]:.1f} |")
        print(f"| {rows} | the layer | {total[0]:.1f} | {total[1]:.1f} ({total[1] / total[0]:.0%}) |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model directory (default: the embedded model)")
    p.add_argument("--shape", default=None, help="instead of --model: a random checkpoint of this shape "
                   "(benchmarks/gpu.py's SHAPES, e.g. chatglm3-6b), built once under --work-dir")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/glmkit-bench"))
    p.add_argument("--kernel", action="store_true", help="time the LoRA kernel alone (GPU)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--concurrent", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto")
    args = p.parse_args()
    if args.kernel:
        return kernel_times(args.shape or "chatglm3-6b", args.rank, args.adapters)
    model = args.model
    if args.shape:
        from gpu import build_checkpoint

        model = str(build_checkpoint(args.shape, args.work_dir, "cuda" if torch.cuda.is_available() else "cpu"))
    llm = LLM(model, dtype=args.dtype, quantization=args.quantization, max_num_seqs=max(args.concurrent),
              max_gpu_adapters=args.adapters, max_lora_rank=args.rank)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.adapters):
            llm.load_adapter(f"a{i}", write_adapter(Path(tmp) / f"a{i}", llm, args.rank, seed=i))
    llm.start_engine_thread()
    names = list(llm.adapters)
    print(f"{llm.model_dir.name}, {llm.dtype}, quantization {llm.resolved_config.quantization}, {llm.device}; "
          f"{args.adapters} LoRA adapters of rank {args.rank} on every linear layer; {args.tokens} tokens per request")
    print("| concurrent | base tok/s | adapters tok/s | adapters / base |\n|---:|---:|---:|---:|")
    rate(llm, 1, 8, [None], 1)  # warm-up
    rate(llm, 1, 8, names[:1], 1)
    for n in args.concurrent:
        spread = names[:1] if n == 1 else names
        base, adapted = [], []
        for _ in range(args.repeats):
            base.append(rate(llm, n, args.tokens, [None], len(spread)))
            adapted.append(rate(llm, n, args.tokens, spread, len(spread)))
        b, a = statistics.median(base), statistics.median(adapted)
        print(f"| {n} | {b:,.1f} | {a:,.1f} | {a / b:.2f}x |", flush=True)
    graphs = llm.engine.runner.graphs
    if graphs is not None:
        print(f"decode steps run as CUDA graphs: {graphs.replays['base']:,} without adapter rows, "
              f"{graphs.replays['lora']:,} with the LoRA kernel")


if __name__ == "__main__":
    main()
