"""`glmkit finetune`: train a LoRA adapter on conversations (ChatGLM3 finetune_demo, OpenAI/ShareGPT messages,
Alpaca, ADGEN), rendered with the model's own chat format, and save it in peft's format:

    glmkit finetune --data train.jsonl --output out/                  # the embedded model, CPU
    glmkit finetune --model /models/chatglm3-6b --data train.jsonl --eval dev.jsonl --output out/ --resume

The defaults suit a small data set (tens of conversations) on a CPU: LoRA r=8 on every linear layer, lr 2e-4,
batches of 4, as many epochs as give about 30 optimizer steps (at least 3). Then `glmkit chat --adapter out/`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import GlmkitError, InvalidParameterError
from .args import _device, existing_path, integer, number, one_of

MIN_STEPS = 30     # the default epochs give at least this many optimizer steps (small data needs repetition)
MAX_AUTO_EPOCHS = 30


# Flags a --config file may set, with their defaults (defaults < config file < flags given on the command line).
DEFAULTS = {"method": "lora", "pre_seq_len": 128, "data": None, "eval": None, "output": None, "epochs": None,
            "max_steps": None, "learning_rate": 2e-4,
            "batch_size": 4, "micro_batch_size": None, "max_length": 1024, "schedule": "cosine",
            "warmup_ratio": 0.1, "seed": 42, "save_every": None, "eval_every": None, "recompute": "auto",
            "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05, "target_modules": "all-linear"}


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="base model directory or .gguf (default: the embedded model)",
                   type=existing_path("--model", "pass a local model directory or .gguf file"))
    p.add_argument("--method", default=None, type=one_of("--method", ("lora", "ptuning")),
                   help="lora (default) or ptuning (P-Tuning v2, ChatGLM checkpoints; saved in ChatGLM's format)")
    p.add_argument("--config", default=None, metavar="YAML", help="settings from a file: ChatGLM3 finetune_demo's "
                   "lora.yaml (data_config, max_input/output_length, training_args, peft_config) or these flags' "
                   "names; flags given here win", type=existing_path("--config", "pass a YAML file"))
    p.add_argument("--data", help="training conversations (.jsonl or .json)",
                   type=existing_path("--data", "pass the training data file"))
    p.add_argument("--eval", help="held-out conversations: their loss is logged as training goes",
                   type=existing_path("--eval", "pass the evaluation data file"))
    p.add_argument("--output", help="directory for the adapter, checkpoints and log.jsonl")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=integer("--epochs", 1),
                   help=f"passes over the data (default: enough for ~{MIN_STEPS} steps, at least 3)")
    g.add_argument("--max-steps", type=integer("--max-steps", 1), help="optimizer steps (overrides --epochs)")
    g.add_argument("--learning-rate", "--lr", type=number("--learning-rate", 0, 1, low_open=True),
                   help="peak learning rate (default 2e-4)")
    g.add_argument("--batch-size", type=integer("--batch-size", 1), help="samples per step (default 4)")
    g.add_argument("--micro-batch-size", type=integer("--micro-batch-size", 1),
                   help="samples per forward pass (default: --batch-size; lower it if memory runs out)")
    g.add_argument("--max-length", type=integer("--max-length", 2), help="tokens per sample; longer ones are cut "
                   "(default 1024)")
    g.add_argument("--pack", action="store_true", help="pack short samples into --max-length sequences")
    g.add_argument("--schedule", type=one_of("--schedule", ("cosine", "linear", "constant")),
                   help="learning-rate decay after the warm-up (default cosine)")
    g.add_argument("--warmup-ratio", type=number("--warmup-ratio", 0, 0.9), help="share of steps (default 0.1)")
    g.add_argument("--seed", type=integer("--seed", 0), help="data order and initial adapters (default 42)")
    g.add_argument("--save-every", type=integer("--save-every", 1),
                   help="steps between checkpoints (default: each epoch)")
    g.add_argument("--eval-every", type=integer("--eval-every", 1),
                   help="steps between evaluations (default: each epoch)")
    g.add_argument("--compile", default="auto", type=one_of("--compile", ("auto", "on", "off")),
                   help="torch.compile the decoder layer (auto: on with a GPU; the first steps take a minute "
                   "longer while it compiles)")
    g.add_argument("--recompute", type=one_of("--recompute", ("auto", "on", "off")),
                   help="activation checkpointing: recompute layers in the backward pass (auto: on with a GPU)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=integer("--lora-r", 1, 1024), help="rank (default 8)")
    g.add_argument("--lora-alpha", type=number("--lora-alpha", 0, low_open=True), help="scale numerator "
                   "(default 16)")
    g.add_argument("--lora-dropout", type=number("--lora-dropout", 0, 0.9), help="default 0.05")
    g.add_argument("--target-modules", help="comma-separated linear layers by the checkpoint's names "
                   "(query_key_value, dense, dense_h_to_4h, dense_4h_to_h; q_proj, ..., down_proj) or all-linear "
                   "(default)")
    g = p.add_argument_group("P-Tuning v2")
    g.add_argument("--pre-seq-len", type=integer("--pre-seq-len", 1, 4096), help="prefix length (default 128)")
    g.add_argument("--prefix-projection", action="store_true", help="ChatGLM's MLP over the prefix embedding")
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", type=one_of("--dtype", ("auto", "float32", "bfloat16", "float16")),
                   help="the frozen base weights' dtype (auto: bfloat16 on GPU and on CPUs with bf16 instructions)")
    g.add_argument("--quantization", default=None, type=one_of("--quantization", ("none", "int8", "int4")),
                   help="train LoRA on an int8 or int4 copy of the base weights (QLoRA: a 6B model in under 8 GB); "
                   "each layer is dequantized as it runs")
    g.add_argument("--threads", default=None, type=integer("--threads", 1), help="CPU threads (default: all)")


def resolve(args) -> None:
    """Fill every flag not given on the command line from --config, else from DEFAULTS; check what must be set."""
    from ..finetune.config import read_config

    from_file = read_config(args.config) if args.config else {}
    for name, default in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, from_file.get(name, default))
    for name in ("data", "output"):
        if getattr(args, name) is None:
            raise GlmkitError(f"--{name} is required: give it on the command line or in the --config file")
    if not Path(args.data).expanduser().is_file():
        raise InvalidParameterError("--data", args.data, "does not exist; pass the training data file")
    if args.eval is not None and not Path(args.eval).expanduser().is_file():
        raise InvalidParameterError("--eval", args.eval, "does not exist; pass the evaluation data file")


def _train_config(args, num_samples: int, on_gpu: bool):
    from ..finetune.train import TrainConfig
    from ..models.lora import LoraConfig

    micro = args.micro_batch_size or args.batch_size
    if args.batch_size % micro:
        raise InvalidParameterError("--batch-size", args.batch_size, f"must be a multiple of --micro-batch-size "
                                    f"({micro})")
    steps_per_epoch = math.ceil(num_samples / args.batch_size)
    epochs = args.epochs or min(MAX_AUTO_EPOCHS, max(3, math.ceil(MIN_STEPS / steps_per_epoch)))
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()])
    recompute = on_gpu if args.recompute == "auto" else args.recompute == "on"
    compiled = on_gpu if args.compile == "auto" else args.compile == "on"
    return TrainConfig(method=args.method, pre_seq_len=args.pre_seq_len, prefix_projection=args.prefix_projection,
                       lora=lora, learning_rate=args.learning_rate, epochs=epochs, max_steps=args.max_steps,
                       batch_size=args.batch_size, micro_batch_size=micro, warmup_ratio=args.warmup_ratio,
                       schedule=args.schedule, seed=args.seed, eval_every=args.eval_every,
                       save_every=args.save_every, recompute=recompute, one_row=not on_gpu,
                       compiled=compiled)


def _samples(path: str, chat_format, max_length: int, pack: bool, what: str, say=print):
    from ..finetune.data import load_samples, pack as pack_samples

    samples, stats = load_samples(path, chat_format, max_length)
    say(f"{what}: {stats.num_records} conversations, {stats.num_tokens} tokens ({stats.num_target_tokens} "
          f"to learn) from {path}")
    if stats.num_truncated:
        say(f"warning: {stats.num_truncated} conversations were longer than --max-length={max_length} and were "
              f"cut" + (f"; {stats.num_empty} lost every answer token and were dropped" if stats.num_empty else ""))
    return pack_samples(samples, max_length) if pack else samples


def _start_distributed(device: str) -> tuple[str, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, one per rank; gloo on CPUs) and
    return this rank's device and rank. Otherwise (device, 0)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return device, dist.get_rank()


def main(args) -> int:
    import torch
    import torch.distributed as dist

    resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, rank = _start_distributed(args.device)
    try:
        return _train(args, device, rank)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, device: str, rank: int) -> int:
    from ..finetune.train import Trainer, latest_checkpoint, load_base

    say = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.output).expanduser()
    resume_from = latest_checkpoint(out) if args.resume else None
    if args.resume and resume_from is None:
        raise InvalidParameterError("--output", args.output, "holds no checkpoint to resume from; run without --resume")
    if not args.resume and ((out / "adapter_config.json").exists() or (out / "pytorch_model.bin").exists()):
        raise InvalidParameterError("--output", args.output, "already holds an adapter; choose a new directory (or "
                                    "--resume an unfinished run there)")
    base = load_base(args.model, device, args.dtype, quantization=args.quantization)
    train = _samples(args.data, base.chat_format, args.max_length, args.pack, "train", say)
    dev = _samples(args.eval, base.chat_format, args.max_length, False, "eval", say) if args.eval else None
    on_gpu = next(base.model.parameters()).is_cuda
    config = _train_config(args, len(train), on_gpu)
    trainer = Trainer(base.model, base.tensor_names, base.name, config, out, train, dev, base.raw_config)
    if resume_from is not None:
        trainer.resume_from(resume_from)
        say(f"resuming from {resume_from} (step {trainer.step} of {trainer.total_steps})")
    world = f" on {trainer.world} processes" if trainer.world > 1 else ""
    what = (f"P-Tuning v2 prefix of {config.pre_seq_len} tokens" if config.method == "ptuning" else
            f"LoRA r={config.lora.r} alpha={config.lora.alpha:g} on {len(trainer.parts)} modules")
    per_step = min(config.batch_size, len(train))  # a batch holds at most every sample there is
    say(f"{what} ({trainer.num_trainable / 1e6:.2f}M trainable parameters); {trainer.total_steps} steps of "
        f"{per_step} sample{'s' * (per_step != 1)}{world}, lr {config.learning_rate:g}, {base.chat_format.name} "
        "format")
    if config.method == "ptuning" and config.pre_seq_len % 16:
        say(f"note: glmkit serves a prefix in whole KV blocks: {config.pre_seq_len} tokens "
            + ("need --block-size 8 when served" if config.pre_seq_len % 8 == 0 else
               "fit no block size, so glmkit will not serve it (ChatGLM's own code will); 128 is usual"))
    last = trainer.fit()
    if "stopped" in last:
        say(f"stopped at step {trainer.step}; checkpoint saved in {last['stopped']}. Continue with the same "
            "command plus --resume")
        return 130
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items() if k in
               ("step", "loss", "eval_loss", "tokens_per_s")}
    saved = ("P-Tuning v2 prefix saved in {} (ChatGLM's format: config.json with pre_seq_len, pytorch_model.bin)"
             if config.method == "ptuning" else "adapter saved in {}")
    say(f"done: {json.dumps(summary)}; {saved.format(out)}. Chat with it: glmkit chat"
        + (f" --model {args.model}" if args.model else "") + f" --adapter {out}")
    return 0
