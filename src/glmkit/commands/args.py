"""Command-line arguments shared by the commands and the terminal chat: the model and sampling flags, and what
they become (LLM keyword arguments, SamplingParams). Knows argparse and the LLM API; not the command table."""

from __future__ import annotations

import argparse


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local model directory or .gguf file (default: embedded "
                   "Qwen2.5-Coder-0.5B-Instruct)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--chat-format", default=None,
                   help="chatglm2, chatglm3, characterglm, glm4 or jinja (default: from the checkpoint)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens")
    g.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB", help="KV cache budget in GiB")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: run the decode step without CUDA graphs")
    g.add_argument("--quantization", default="auto", choices=("auto", "none", "int8", "int4"),
                   help="weight-only quantization of the linear layers (auto: as the checkpoint is stored; "
                   "int8 for the embedded model on a CPU with bf16 instructions)")


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float, top_p: float, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens per answer (default {max_tokens})")
    g.add_argument("--seed", type=int, default=None)


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, device=args.device, chat_format=args.chat_format, max_model_len=args.max_model_len,
                kv_cache_memory_gb=args.kv_cache_memory, num_threads=args.threads, quantization=args.quantization,
                enforce_eager=args.enforce_eager)


def load_llm(args, **overrides):
    # Imported here: LLM pulls in torch, and `glmkit --help` should not wait for it.
    from ..llm import LLM

    return LLM(args.model, **(engine_kwargs(args) | overrides))


def sampling_params(args):
    from ..engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed)
