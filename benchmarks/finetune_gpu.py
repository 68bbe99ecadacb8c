"""LoRA training speed and memory on a GPU: glmkit against transformers + peft, same shape, same run.

    python benchmarks/finetune_gpu.py [--shape chatglm3-6b] [--batch 4] [--seq 768] [--rank 32] [--steps 10]
        [--recompute on|off] [--compile on|off] [--sides hf glmkit] [--repeats 1]
        [--quantization int4 --sides glmkit]      # LoRA on an int4 base: its training peak
        [--method ptuning --pre-seq-len 128]       # P-Tuning v2 (transformers + peft: prefix tuning, which
                                                   # refuses activation checkpointing, so it runs without)

Each side runs in a subprocess of its own (so the peak memory of one does not count against the other) on a
random-weight bf16 model of the ChatGLM3-6B shape (transformers' GlmForCausalLM, the -hf layout, for both:
glmkit maps the same module names), LoRA r=32 (alpha 64, dropout 0.05) on every linear layer (q, k, v, o,
gate_up, down), fp32 adapter weights, AdamW, gradient clipping, batches of 4 x 768 random tokens with every
token a target, activation checkpointing as --recompute says. After 3 warm-up steps, --steps steps are timed
one by one (CUDA-synchronised); the table gives the median step's trained tokens/s and the peak allocated
memory over the whole run, and glmkit's ratio to transformers + peft measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import SHAPES  # noqa: E402  (benchmarks/gpu.py: the model shapes)

WARMUP = 3
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def hf_config(shape: str):
    from transformers import GlmConfig

    return GlmConfig(**SHAPES[shape], partial_rotary_factor=0.5, attention_bias=True, max_position_embeddings=8192,
                     eos_token_id=[0], pad_token_id=0, tie_word_embeddings=False)


def random_tokens(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), generator=g)


def run_hf(args) -> list[float]:
    import peft
    from transformers import GlmForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GlmForCausalLM._from_config(hf_config(args.shape), torch_dtype=torch.bfloat16,
                                            attn_implementation="sdpa")
    if args.method == "ptuning":  # peft's prefix tuning: past key values, no activation checkpointing
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                   num_virtual_tokens=args.pre_seq_len))
        return train_hf(model, args)
    if args.recompute == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                                       target_modules=MODULES))
    return train_hf(model, args)


def train_hf(model, args) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    ids = random_tokens(args).cuda()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, args)


def run_glmkit(args) -> list[float]:
    from glmkit.finetune.data import Sample
    from glmkit.finetune.train import TrainConfig, Trainer
    from glmkit.models.glm import config_from_glm_hf
    from glmkit.models.layers import DecoderModel
    from glmkit.models.lora import LoraConfig

    if args.budget is not None:
        from glmkit.models import training
        training.ACTIVATION_BUDGET = args.budget
    config = config_from_glm_hf(hf_config(args.shape).to_dict() | {"model_type": "glm"})
    if args.method == "ptuning":  # ChatGLM's P-Tuning v2 (the same architecture as the -hf layout's GLM)
        config = replace(config, model_type="chatglm")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of 6B weights on the way
    with torch.device("cuda"):
        model = DecoderModel(config)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if args.quantization != "none":
        quantize_linears(model, int(args.quantization[3:]))
        torch.cuda.reset_peak_memory_stats()  # a checkpoint loads quantizing tensor by tensor: count training only
    model.finish_loading()
    names = [f"model.layers.{i}.{m}.weight" for i in range(config.num_layers) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_up_proj",
              "mlp.down_proj")]
    ids = random_tokens(args)
    samples = [Sample(row.tolist(), [False] + [True] * (args.seq - 1), "bench") for row in ids]
    train = TrainConfig(method=args.method, pre_seq_len=args.pre_seq_len,
                        lora=LoraConfig(r=args.rank, alpha=2 * args.rank, dropout=0.05, target_modules=MODULES),
                        batch_size=args.batch, micro_batch_size=args.batch, max_steps=10**6,
                        recompute=args.recompute == "on", compiled=args.compile == "on")
    trainer = Trainer(model, names, "bench", train, Path("/tmp/glmkit-bench-unused"), samples)
    return timed(trainer.train_step, args)


def quantize_linears(model, bits: int) -> None:
    """Replace every decoder linear by a QuantLinear in the portable layout (what `--quantization` trains on)."""
    from glmkit.models.quant import QuantLinear, QuantPlan, quantize

    plan = QuantPlan.fresh(bits)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.startswith("layers."):
            parent, _, child = name.rpartition(".")
            b = plan.bits_for(name)
            q = QuantLinear(module.in_features, module.out_features, module.bias is not None, b, plan.group_size)
            q.qweight, q.scales = quantize(b, module.weight.data, plan.group_size)
            if module.bias is not None:
                q.bias = torch.nn.Parameter(module.bias.data)
            setattr(model.get_submodule(parent), child, q)
    torch.cuda.empty_cache()


def timed(step, args) -> list[float]:
    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), file=sys.stderr)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def child(args) -> None:
    torch.cuda.reset_peak_memory_stats()
    times = (run_hf if args.side == "hf" else run_glmkit)(args)
    print(json.dumps({"side": args.side, "times": times, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="chatglm3-6b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=768)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--method", default="lora", choices=("lora", "ptuning"))
    p.add_argument("--pre-seq-len", type=int, default=128, help="ptuning: the prefix length")
    p.add_argument("--recompute", default="on", choices=("on", "off"))
    p.add_argument("--compile", default="off", choices=("on", "off"), help="glmkit: torch.compile the layer")
    p.add_argument("--quantization", default="none", choices=("none", "int8", "int4"),
                   help="glmkit: LoRA on an int8/int4 copy of the base (the peak counts training, not the build)")
    p.add_argument("--budget", type=float, default=None, help="glmkit compiled: the activation memory budget")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step per side")
    p.add_argument("--sides", nargs="+", default=["hf", "glmkit"], choices=("hf", "glmkit"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--side", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args)
    method = (f"LoRA r={args.rank} on {', '.join(MODULES)}" if args.method == "lora" else
              f"P-Tuning v2 prefix {args.pre_seq_len} (transformers + peft: prefix tuning without checkpointing)")
    print(f"{args.shape}, {method}, batch {args.batch} x {args.seq} tokens, "
          f"activation checkpointing {args.recompute}, {torch.cuda.get_device_name()}")
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for side in args.sides:
            cmd = [sys.executable, __file__, "--side", side] + sys.argv[1:]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{side} failed:\n{out.stderr[-3000:]}")
                continue
            results.setdefault(side, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            if args.profile:
                print(f"-- {side}\n{out.stderr[-6000:]}")
    tokens = args.batch * args.seq
    rates = {}
    print("| side | tokens/s (median step) | step s | peak GB |\n|---|---:|---:|---:|")
    for side, runs in results.items():
        step = statistics.median(t for r in runs for t in r["times"])
        rates[side] = tokens / step
        print(f"| {side} | {rates[side]:,.0f} | {step:.3f} | {max(r['peak_gb'] for r in runs):.2f} |")
    if len(rates) == 2:
        print(f"glmkit / transformers+peft: {rates['glmkit'] / rates['hf']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
