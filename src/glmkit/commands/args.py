"""Command-line arguments shared by the commands and the terminal chat: the model and sampling flags, the checks
that run while argparse reads them, and what they become (LLM keyword arguments, SamplingParams).

Every flag is checked here, before torch is imported or anything is loaded, so `--max-tokens 0` fails at once
and the message names the flag as the user typed it (`--threads`, not `num_threads`), the value, the limit and
the fix. Knows argparse and the LLM API; not the command table, and nothing of torch (imported lazily).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

from ..config import DTYPES
from ..errors import InvalidParameterError


def _flag_error(flag: str, text: str, message: str) -> argparse.ArgumentTypeError:
    # The same `flag=value: message` shape as InvalidParameterError, so every user mistake reads alike.
    return argparse.ArgumentTypeError(str(InvalidParameterError(flag, _Shown(text), message)))


class _Shown(str):
    """The value as typed, shown bare when it is a number (`--port=0`) and quoted otherwise (`--port='x'`)."""

    def __repr__(self) -> str:
        text = str(self)
        try:
            float(text)
            return text
        except ValueError:
            return repr(text)


def _checked(flag: str, convert: Callable[[str], float], ok: Callable[[float], bool], limit: str,
             fix: str) -> Callable[[str], float]:
    """An argparse type: convert(text), refused with one line naming the flag unless ok(value)."""
    suffix = f"; {fix}" if fix else ""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise _flag_error(flag, text, limit + suffix) from None
        if not ok(value):
            raise _flag_error(flag, text, limit + suffix)
        return value

    return parse


def integer(flag: str, low: int, high: int | None = None, fix: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high]."""
    limit = f"must be a whole number from {low} to {high}" if high is not None else f"must be a whole number >= {low}"
    return _checked(flag, int, lambda v: low <= v and (high is None or v <= high), limit, fix)


def number(flag: str, low: float, high: float | None = None, *, low_open: bool = False,
           fix: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high], or (low, high] when low_open."""
    if high is None:
        limit = f"must be a number {'>' if low_open else '>='} {low:g}"
    else:
        limit = f"must be in {'(' if low_open else '['}{low:g}, {high:g}]"

    def ok(v: float) -> bool:
        above = v > low if low_open else v >= low
        return math.isfinite(v) and above and (high is None or v <= high)

    return _checked(flag, float, ok, limit, fix)


def size(flag: str, low: int, fix: str = "") -> Callable[[str], int]:
    """An argparse type: a byte count, plain or with a binary unit (512K, 8M, 1G), at least `low`."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

    def to_bytes(text: str) -> int:
        text = text.strip().upper().removesuffix("B").removesuffix("I")
        number = float(text[:-1] if text[-1:] in units else text)
        if not math.isfinite(number):
            raise ValueError(text)
        return int(number * units.get(text[-1:], 1))

    return _checked(flag, to_bytes, lambda v: v >= low, f"must be a size of at least {low} bytes (e.g. 8M, 512K)", fix)


def one_of(flag: str, names, fix: str = "") -> Callable[[str], str]:
    """An argparse type: one of `names` (shown in the message, so the user sees every choice)."""
    def parse(text: str) -> str:
        if text not in names:
            raise _flag_error(flag, text, f"must be one of {', '.join(names)}" + (f"; {fix}" if fix else ""))
        return text

    return parse


def existing_path(flag: str, what: str) -> Callable[[str], str]:
    """An argparse type: a path that exists (only checked; the command opens it later)."""
    def parse(text: str) -> str:
        if not Path(text).expanduser().exists():
            raise _flag_error(flag, text, f"does not exist; {what}")
        return text

    return parse


def adapter_spec(text: str) -> tuple[str, str]:
    """--adapter [NAME=]DIR -> (name, directory); the name defaults to the directory's own name."""
    from ..config import ADAPTER_NAME

    name, sep, path = text.partition("=")
    if not sep or Path(text).expanduser().exists():  # a directory whose name holds "=" is a directory
        name, path = Path(text).expanduser().resolve().name, text
    if not Path(path).expanduser().is_dir():
        raise _flag_error("--adapter", text, "is not a directory; pass [NAME=]DIR, DIR being what a LoRA "
                          "fine-tuning saved (glmkit finetune --output, or peft's save_pretrained)")
    if not ADAPTER_NAME.fullmatch(name):
        raise _flag_error("--adapter", text, f"the name {name!r} must be 1-128 letters, digits or . _ : / - "
                          "(starting with a letter or digit); give one: --adapter NAME=DIR")
    return name, path


def _device(text: str) -> str:
    index = text.removeprefix("cuda:")
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and index.isdigit()):
        return text
    raise _flag_error("--device", text, "must be auto, cpu, cuda or cuda:N (N: the GPU's index)")


def _chat_format(text: str) -> str:
    from ..chat import FORMATS  # jinja2, not torch: imported only when the flag is given

    return one_of("--chat-format", FORMATS, "omit it to use the checkpoint's own format")(text)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local model directory or .gguf file (default: embedded "
                   "Qwen2.5-Coder-0.5B-Instruct)", type=existing_path(
                       "--model", "pass a local model directory or .gguf file (glmkit never downloads weights), "
                       "or omit --model for the embedded default model"))
    g.add_argument("--dtype", default="auto", type=one_of("--dtype", list(DTYPES)),
                   help="auto (bfloat16 on GPU and for int8/int4 weights; float32 otherwise), float32, bfloat16, "
                   "float16")
    g.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--chat-format", default=None, type=_chat_format,
                   help="chatglm2, chatglm3, characterglm, glm4 or jinja (default: from the checkpoint)")
    g.add_argument("--max-model-len", default=None, help="context limit in tokens",
                   type=integer("--max-model-len", 1, fix="omit it to use the model's own limit"))
    g.add_argument("--kv-cache-memory", default=None, metavar="GIB", help="KV cache budget in GiB",
                   type=number("--kv-cache-memory", 0, low_open=True, fix="e.g. --kv-cache-memory 1 (GiB)"))
    g.add_argument("--threads", default=None, help="CPU threads (default: chat and generate leave one core "
                   "free, serve uses every core)",
                   type=integer("--threads", 1, fix="omit it to use the default"))
    g.add_argument("--enforce-eager", action="store_true", help="CUDA: run the decode step without CUDA graphs")
    g.add_argument("--quantization", default="auto",
                   type=one_of("--quantization", ("auto", "none", "int8", "int8a8", "int4")),
                   help="quantization of the linear layers: auto, none, int8, int8a8 (int8 weights and int8 activations, "
                   "on CUDA or an x86 CPU with AVX2; on CUDA the fastest at 64+ concurrent requests), int4 (auto: as the checkpoint is stored; for the embedded model "
                   "on a CPU, int8a8 where it has AVX2, else int8 where it has bf16 instructions)")
    g.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR", type=adapter_spec,
                   help="a LoRA adapter directory (glmkit finetune's output, or peft's) served beside the model; "
                   "NAME (default: the directory's name) is what requests put in `model`. Repeat it to serve "
                   "several (serve); chat, generate and eval answer with the one given")
    g.add_argument("--max-adapters", default=32, metavar="N", help="adapters loaded at once, by --adapter and at run "
                   "time (default 32)", type=integer("--max-adapters", 1, fix="e.g. --max-adapters 64"))
    g.add_argument("--max-gpu-adapters", default=8, metavar="N", help="CUDA: LoRA adapters resident on the GPU at "
                   "once, in slots sized at start so CUDA graphs run them; others wait in host memory (default 8)",
                   type=integer("--max-gpu-adapters", 1, fix="e.g. --max-gpu-adapters 16"))
    g.add_argument("--max-lora-rank", default=None, metavar="R", help="CUDA: the highest LoRA rank the GPU slots "
                   "hold (default: the --adapter adapters' highest; set it to load higher ranks at run time)",
                   type=integer("--max-lora-rank", 1, fix="e.g. --max-lora-rank 64"))


def add_sampling_arguments(p: argparse.ArgumentParser, temperature: float, top_p: float, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", default=temperature, help=f"0 = greedy (default {temperature})",
                   type=number("--temperature", 0, 100, fix="0 is greedy, 0.2-1 is usual"))
    g.add_argument("--top-p", default=top_p, help=f"nucleus sampling mass (default {top_p})",
                   type=number("--top-p", 0, 1, low_open=True, fix="1 turns nucleus sampling off"))
    g.add_argument("--top-k", default=0, help="keep the k most likely tokens (0 = off)",
                   type=integer("--top-k", 0, fix="0 turns top-k off"))
    g.add_argument("--repetition-penalty", default=1.0, help="> 1 discourages repeats (default 1.0 = off)",
                   type=number("--repetition-penalty", 0, 10, low_open=True, fix="1 turns it off"))
    g.add_argument("--max-tokens", default=max_tokens, help=f"tokens per answer (default {max_tokens})",
                   type=integer("--max-tokens", 1, fix=f"e.g. --max-tokens {max_tokens}"))
    g.add_argument("--seed", default=None, help="sampling seed, for repeatable answers",
                   type=integer("--seed", 0, 2**63 - 1, fix="omit it for a random seed"))


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, device=args.device, chat_format=args.chat_format, max_model_len=args.max_model_len,
                kv_cache_memory_gb=args.kv_cache_memory, num_threads=args.threads, quantization=args.quantization,
                enforce_eager=args.enforce_eager, adapters=adapters(args), max_adapters=args.max_adapters,
                max_gpu_adapters=args.max_gpu_adapters, max_lora_rank=args.max_lora_rank)


def adapters(args) -> dict[str, str] | None:
    """The --adapter flags as {name: directory}; a name given twice is an error."""
    pairs = getattr(args, "adapter", None) or []
    names = [name for name, _ in pairs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice:
        raise InvalidParameterError("--adapter", twice, "names two adapters; give each its own NAME=DIR")
    return dict(pairs) or None


def use_one_adapter(llm, flag_values) -> None:
    """chat, generate and eval answer with the adapter given (one at most)."""
    if flag_values and len(flag_values) > 1:
        raise InvalidParameterError("--adapter", " ".join(f"{n}={p}" for n, p in flag_values),
                                    "gives several adapters; this command answers with one (serve takes several)")
    if flag_values:
        llm.default_adapter = flag_values[0][0]


def one_core_free() -> int:
    """CPU threads for one conversation: every core this process may use but one. With all of them, anything
    else on the machine stalls PyTorch's threads at their barriers: on the project's 2-core machine, two threads
    decoded 2.5 tok/s beside one busy process (4.6 alone), one thread 4.3 (4.9 alone): as fast alone, and it
    does not collapse (benchmarks/threads.py; README, Terminal chat)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable - 1)


def load_llm(args, **overrides):
    """The LLM for a single-stream command (chat, generate, info); `serve` builds its own with every core."""
    # Imported here: LLM pulls in torch, and `glmkit --help` should not wait for it.
    from ..llm import LLM

    kwargs = engine_kwargs(args) | overrides
    kwargs["num_threads"] = kwargs["num_threads"] or one_core_free()
    llm = LLM(args.model, **kwargs)
    use_one_adapter(llm, getattr(args, "adapter", None))
    return llm


def sampling_params(args):
    from ..engine.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens, seed=args.seed)
