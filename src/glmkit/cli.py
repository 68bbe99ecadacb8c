"""`glmkit <command>`: a fixed table of subcommands, each a module with add_arguments(parser) and main(args)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "chat": ("glmkit.ui.terminal", "chat in the terminal with a local model (default: the embedded model)"),
    "generate": ("glmkit.ui.generate", "complete one prompt and print it"),
    "serve": ("glmkit.ui.serve", "serve the OpenAI-compatible and ChatGLM APIs over HTTP"),
    "info": ("glmkit.ui.info", "show the resolved model, chat format and limits"),
    "quantize": ("glmkit.ui.quantize", "save an int8/int4 copy of a model that loads without quantizing again"),
}


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
    from .llm import LLM

    return LLM(args.model, **(engine_kwargs(args) | overrides))


def sampling_params(args):
    from .engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmkit", description="Deploy ChatGLM-family and other chat models privately.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
        modules[name] = module
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    from .errors import GlmkitError

    try:
        return modules[args.command].main(args) or 0
    except GlmkitError as e:
        print(f"glmkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
