"""LLM: the in-process Python API. Loads a model directory (or GGUF, or the embedded default), its tokenizer
and chat format, sizes the KV cache, and runs `generate` / `chat` on the engine.

Shapes follow vLLM's: `generate(prompts, params)` and `chat(messages, params)` return RequestOutputs. The LLM
steps its engine itself until `start_engine_thread()` hands the engine to a background thread (the server does);
from then on its own calls go through that thread too, so they never race the server's requests.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Generator, Iterator

import torch

from .chat import get_chat_format
from .chat.serving import ChatServing
from .chat.tool_calls import ParsedOutput
from .config import DTYPES, EngineConfig, check_adapter_name
from .engine.async_engine import AsyncLLMEngine
from .engine.llm_engine import LLMEngine
from .engine.outputs import Delta, OutputCollector, RequestOutput
from .engine.runner import ModelRunner, kv_bytes_per_token
from .engine.sampling_params import SamplingParams
from .errors import InvalidParameterError, ModelLoadError
from .models import default
from .models.loader import load_model, read_config
from .models.adapters import read_served_adapter
from .models.lora import lora_rank
from .models.ptuning import PrefixAdapter
from .models.quant import QuantPlan, bits_of, plan_for
from .tokenizers import load_tokenizer

log = logging.getLogger("glmkit")
steps = logging.getLogger("glmkit.steps")  # one line before each long step (models/gguf.py says why)


def resolve_model_dir(model: str | None) -> Path:
    """A directory with config.json: as given, converted from a GGUF file, or the embedded default model's
    float32 conversion."""
    from .models.gguf import ensure_converted

    if model is None:
        return default.ensure_float_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {model!r} does not exist; pass a local model directory or .gguf file "
                             "(glmkit never downloads weights), or omit --model for the embedded default model")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{model!r} is a file but not a .gguf; pass the model's directory instead")
        return ensure_converted(path)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        return ensure_converted(ggufs[0])
    return path


def default_model_dir(requested: str | None) -> Path:
    """The embedded model's directory for a start that asks for `requested` quantization (None: float).

    A quantized copy is looked for first, without converting anything, so once it exists a start loads it
    directly. The start that makes it keeps the float32 conversion it was made from only while a start with no
    flags still needs that: where that start loads float32 (a GPU; a CPU without bf16 instructions, where this
    copy exists because a flag asked for it), or its own copy is not made yet. Otherwise the 2.4 GB would sit
    in the cache unused: a later conversion can be made again from the installed parts.
    """
    from .models.gguf import remove_orphans

    remove_orphans()
    if requested is None:
        return default.ensure_float_dir()
    plan = QuantPlan.fresh(bits_of(requested))
    copy = default.quantized_dir(plan.tag)
    if default.is_built(copy):
        return copy
    source = default.ensure_float_dir()
    from .models.export import cached_quantized_copy

    try:
        copy = cached_quantized_copy(source, plan)
    except OSError as e:  # a read-only or full cache: quantize in memory on every start instead
        log.warning("glmkit: cannot keep a quantized copy of the default model (%s); quantizing in memory", e)
        return source
    start_dir = default.default_start_dir()
    if start_dir != source and default.is_built(start_dir):
        default.drop_float_dir(start_dir)
    return copy


def _device(config: EngineConfig) -> torch.device:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidParameterError("device", config.device, "CUDA is not available on this machine; use cpu")
    return torch.device(device)


def _requested_quantization(config: EngineConfig, device: torch.device) -> str | None:
    if config.quantization != "auto":
        return None if config.quantization == "none" else config.quantization
    if config.model is None and DTYPES[config.dtype] is None:
        return default.start_quantization(device.type)
    return None


def _check_int8_activations(plan: QuantPlan | None, device: torch.device) -> None:
    """int8a8 runs byte x byte products: on CUDA's int8 tensor cores, or on an x86 CPU with AVX2. Said before
    minutes of loading."""
    if plan is None or not plan.int8_activations or device.type == "cuda":
        return
    from .models import cpu_int8

    if device.type != "cpu":
        raise InvalidParameterError("quantization", "int8a8", f"int8 activations run on CUDA or an x86 CPU, not "
                                    f"{device.type}: use int8 or int4")
    if not cpu_int8.runs_here():
        raise InvalidParameterError("quantization", "int8a8", "int8 activations need an x86 CPU with AVX2 and "
                                    "PyTorch's fbgemm; this one lacks them: use int8")


def _dtype(config: EngineConfig, device: torch.device, plan: QuantPlan | None) -> torch.dtype:
    name = DTYPES[config.dtype] or ("bfloat16" if device.type == "cuda" or plan else "float32")
    if plan is not None and name == "float32":  # say so before minutes of loading, not after
        raise InvalidParameterError("dtype", config.dtype, f"{plan.mode} weights run with bfloat16 or float16 "
                                    "activations; use --dtype bfloat16 (or leave it auto)")
    return getattr(torch, name)


def default_kv_budget(device: torch.device) -> int:
    """Bytes for the KV pool when --kv-cache-memory is not given: 40% of free GPU memory, else 2 GiB on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.4)
    return 2 * 2**30


def kv_cache_blocks(budget: int, bytes_per_token: int, block_size: int, model_len: int, max_num_seqs: int) -> int:
    """How many KV blocks a budget buys, never more than max_num_seqs full-length sequences can use (small models
    on big GPUs). Pure arithmetic, so `glmkit info` can report a pool it does not allocate."""
    num_blocks = max(budget // (bytes_per_token * block_size) - 1, 1)  # the runner adds one scratch block
    return min(num_blocks, max_num_seqs * -(-model_len // block_size))


class LLM:
    def __init__(self, model: str | None = None, **kwargs):
        self.config = EngineConfig(model=model, **kwargs)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.device = _device(self.config)  # first: a missing GPU is reported before a conversion, not after
        requested = _requested_quantization(self.config, self.device)
        if model is None:
            self.model_dir = default_model_dir(requested)
        else:
            self.model_dir = resolve_model_dir(model)
        raw_config, self.model_config = read_config(self.model_dir)
        if model is None:  # the GGUF's own name field says "... AWQ", which this Q4_K_M file is not
            self.model_config = replace(self.model_config, name=default.NAME)
        self.quantization = plan_for(raw_config, requested)
        _check_int8_activations(self.quantization, self.device)
        self.dtype = _dtype(self.config, self.device, self.quantization)
        self.tokenizer = load_tokenizer(self.model_dir)
        steps.info("glmkit: loading %s", self.model_dir)
        self.model = load_model(self.model_dir, self.model_config, self.dtype, self.device, self.quantization)
        mc = self.model_config
        self.chat_format = get_chat_format(self.config.chat_format, tokenizer=self.tokenizer,
                                           model_type=mc.model_type, model_name=mc.name or self.model_dir.name,
                                           eos_token_ids=mc.eos_token_ids)
        self.chat_serving = ChatServing(self.chat_format)
        eos = set(mc.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        kv_budget = self._kv_cache_budget()
        self.engine = self._build_engine(sorted(eos), kv_budget)
        self._engine_thread: AsyncLLMEngine | None = None
        self.adapters: dict[str, int] = {}       # loaded adapters (LoRA, P-Tuning): name -> engine id, never reused
        self._unloading: set[str] = set()        # names whose running requests an unload waits for (still taken)
        self._next_adapter_id = 1
        self._adapter_lock = threading.Lock()   # loads and unloads may come from several threads (the server)
        self.default_adapter: str | None = None  # the adapter this LLM's own calls use when they name none
        for name, path in (self.config.adapters or {}).items():
            self.load_adapter(name, path)
        self.resolved_config = replace(
            self.config, model=str(self.model_dir), device=str(self.device), chat_format=self.chat_format.name,
            dtype=str(self.dtype).removeprefix("torch."), max_model_len=self.engine.max_model_len,
            quantization=self.quantization.mode if self.quantization else "none",
            num_threads=self.config.num_threads or torch.get_num_threads(),
            kv_cache_memory_gb=float(f"{kv_budget / 2**30:.4g}"))
        log.info("glmkit: %s kv_blocks=%d", self.resolved_config.summary(), self.engine.blocks.num_blocks)

    # -- adapters ----------------------------------------------------------------------------------------
    def _on_engine(self, fn):
        """fn(engine) on the engine's thread once one runs (between steps), else here."""
        if self._engine_thread is None:
            return fn(self.engine)
        return self._engine_thread.call(fn).result()

    def load_adapter(self, name: str, path: str | Path) -> int:
        """Load an adapter directory under `name` (a peft LoRA, or ChatGLM's P-Tuning v2); requests naming it run
        through it. Returns its engine id. A bad directory, or one made for another model, raises and loads
        nothing."""
        def taken():
            if name in self.adapters or name in self._unloading:
                raise InvalidParameterError("adapter name", name, "is already loaded; unload it first or pick "
                                            "another name")

        def full():
            limit = self.config.max_adapters
            if len(self.adapters) + len(self._unloading) >= limit:
                raise InvalidParameterError("max_adapters", limit, f"adapters are loaded ({', '.join(self.adapters)}); "
                                            "unload one first, or start with a larger --max-adapters")

        check_adapter_name(name)
        taken()  # before reading the files; again below, as another thread may load it meanwhile
        full()
        adapter = read_served_adapter(path, self.model_config)
        with self._adapter_lock:
            taken()
            full()
            adapter_id = self._next_adapter_id
            self._next_adapter_id += 1
            self._on_engine(lambda engine: engine.add_adapter(adapter_id, adapter))
            self.adapters[name] = adapter_id
        steps.info("glmkit: adapter %s loaded from %s (%s)", name, adapter.path,
                   f"{'peft prefix tuning' if adapter.after_prefix else 'P-Tuning v2'}, a {adapter.pre_seq_len}-token "
                   "prefix" if isinstance(adapter, PrefixAdapter) else
                   f"LoRA r={adapter.config.r} on {len(adapter.weights)} modules")
        return adapter_id

    def unload_adapter(self, name: str, timeout_s: float = 30.0) -> None:
        """Stop serving an adapter: new requests naming it are refused at once; its running requests finish
        first (up to `timeout_s`; still running then, it stays loaded and this raises)."""
        with self._adapter_lock:
            adapter_id = self.adapter_id(name)
            del self.adapters[name]  # new requests naming it are refused from now on
            self._unloading.add(name)
        try:
            deadline = time.monotonic() + timeout_s
            while (running := self._on_engine(lambda engine: engine.remove_adapter(adapter_id))) > 0:
                if time.monotonic() > deadline:
                    with self._adapter_lock:
                        self.adapters[name] = adapter_id
                    raise InvalidParameterError("adapter name", name, f"is in use by {running} running request(s) "
                                                f"after {timeout_s:g} s; retry when they have finished")
                time.sleep(0.05)
        finally:
            self._unloading.discard(name)
        if self.default_adapter == name:
            self.default_adapter = None
        steps.info("glmkit: adapter %s unloaded", name)

    def adapter_id(self, name: str | None) -> int | None:
        """The engine id of a loaded adapter (None: the base model)."""
        if name is None:
            return None
        if name not in self.adapters:
            loaded = ", ".join(self.adapters) or "none"
            raise InvalidParameterError("adapter", name, f"is not loaded (loaded adapters: {loaded})")
        return self.adapters[name]

    def _for_adapter(self, params: list[SamplingParams], adapter: str | None) -> list[SamplingParams]:
        adapter_id = self.adapter_id(adapter if adapter is not None else self.default_adapter)
        return [p if p.adapter_id == adapter_id else replace(p, adapter_id=adapter_id) for p in params]

    def start_engine_thread(self) -> AsyncLLMEngine:
        """Hand the engine to one background thread (once) and return it; this LLM's own calls use it too."""
        if self._engine_thread is None:
            self._engine_thread = AsyncLLMEngine(self.engine)
        return self._engine_thread

    def _kv_cache_budget(self) -> int:
        """Bytes for the KV pool: as configured, else the device's default."""
        if self.config.kv_cache_memory_gb is not None:
            return int(self.config.kv_cache_memory_gb * 2**30)
        return default_kv_budget(self.device)

    def _build_engine(self, eos_token_ids: list[int], budget: int) -> LLMEngine:
        c = self.config
        per_token = kv_bytes_per_token(self.model, self.dtype)
        model_len = c.max_model_len or self.model_config.max_position_embeddings
        num_blocks = kv_cache_blocks(budget, per_token, c.block_size, model_len, c.max_num_seqs)
        capacity = num_blocks * c.block_size
        max_len = min(model_len, capacity)
        if c.max_model_len and c.max_model_len > capacity:
            log.warning("max_model_len=%d does not fit the KV cache (%d tokens); using %d. Raise "
                        "--kv-cache-memory to allow longer contexts", c.max_model_len, capacity, max_len)
        log.info("glmkit: KV cache %d blocks x %d = %d tokens (%.2f GiB of a %.2f GiB budget)", num_blocks,
                 c.block_size, capacity, num_blocks * c.block_size * per_token / 2**30, budget / 2**30)
        slots, rank = self._lora_slots()
        runner = ModelRunner(self.model, num_blocks, c.block_size, self.dtype, max_len, c.max_num_seqs,
                             cuda_graphs=not c.enforce_eager, adapter_slots=slots, max_lora_rank=rank)
        return LLMEngine(runner, self.tokenizer, num_blocks, c.block_size, max_len, c.max_num_seqs,
                         c.max_num_batched_tokens, eos_token_ids, c.enable_prefix_caching)

    def _lora_slots(self) -> tuple[int, int]:
        """(GPU slots, their rank) for LoRA adapters: none unless on CUDA with a LoRA among the start adapters (a
        prefix needs no slot) or a rank set."""
        c = self.config
        ranks = [r for r in map(lora_rank, (c.adapters or {}).values()) if r]
        if self.device.type != "cuda" or not (ranks or c.max_lora_rank):
            return 0, 16
        return c.max_gpu_adapters, c.max_lora_rank or max(ranks)

    # -- prompts ---------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if getattr(self.tokenizer, "add_bos_token", False) and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id] + ids
            return ids
        if isinstance(prompt, (list, tuple)) and all(isinstance(i, int) for i in prompt):
            return list(prompt)
        raise InvalidParameterError("prompt", prompt, "must be a string or a list of token ids")

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    character: dict | None = None) -> list[int]:
        return self.chat_serving.render(messages, tools, character).prompt_ids

    # -- running ---------------------------------------------------------------------------------------
    def _deltas(self, requests: list[tuple[list[int], SamplingParams, str]]) -> Iterator[Delta]:
        """The deltas of these requests until every choice has finished; closing early aborts them."""
        for prompt_ids, p, _ in requests:  # reject a bad batch before any of it runs
            self.engine.validate(prompt_ids, p)
        if self._engine_thread is not None:
            yield from self._engine_thread.stream(requests)
            return
        remaining = {request_id: p.n for _, p, request_id in requests}
        try:
            for prompt_ids, p, request_id in requests:
                self.engine.add_request(prompt_ids, p, request_id)
            while any(remaining.values()):
                for d in self.engine.step():
                    if d.request_id in remaining:
                        remaining[d.request_id] -= d.finished
                        yield d
        finally:
            for request_id, left in remaining.items():
                if left:
                    self.engine.abort(request_id)

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
        ids = [uuid.uuid4().hex for _ in prompts]
        collectors = {rid: OutputCollector(rid, prompt, p.n) for rid, prompt, p in zip(ids, prompts, params)}
        for d in self._deltas(list(zip(prompts, params, ids))):
            collectors[d.request_id].add(d)
        return [collectors[rid].result() for rid in ids]

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 adapter: str | None = None) -> list[RequestOutput]:
        """`adapter`: a loaded adapter's name (None: `default_adapter`, else the base model); so for every call."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [self.encode_prompt(p) for p in prompts]
        return self._run(encoded, self._for_adapter(self._params_list(params, len(encoded)), adapter))

    def chat(self, messages, params: SamplingParams | None = None, *, tools: list[dict] | None = None,
             character: dict | None = None, tool_choice=None, response_format: dict | None = None,
             parallel_tool_calls: bool = True, adapter: str | None = None) -> list[RequestOutput]:
        """One conversation (a list of message dicts) or a list of conversations. `tool_choice` and
        `response_format` take the OpenAI chat API's values; a forced call or a JSON answer is held to its
        grammar (choice.text then parses with json.loads; choice.tool_calls has the call)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        serving, limit = self.chat_serving, self.engine.max_model_len
        prompts = [serving.render(conv, tools, character, tool_choice, response_format=response_format,
                                  parallel_tool_calls=parallel_tool_calls) for conv in conversations]
        params = [serving.sampling_params(p, prompt, limit)
                  for p, prompt in zip(self._for_adapter(self._params_list(params, len(prompts)), adapter), prompts)]
        outputs = self._run([prompt.prompt_ids for prompt in prompts], params)
        for prompt, out in zip(prompts, outputs):
            for choice in out.outputs:
                parsed = serving.parse(prompt, choice.token_ids)
                choice.text, choice.tool_calls = parsed.content, parsed.tool_calls
        return outputs

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, *,
               adapter: str | None = None) -> Iterator[tuple[str, Delta]]:
        """Yield (text delta, engine delta) for one raw prompt (no chat format) as the engine produces them; the
        texts add up to `generate(prompt)`'s text. Closing the iterator aborts the request."""
        params, = self._for_adapter([params or SamplingParams()], adapter)
        deltas = self._deltas([(self.encode_prompt(prompt), params, uuid.uuid4().hex)])
        try:
            for d in deltas:
                yield d.text, d
        finally:
            deltas.close()

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None, *,
                    tools: list[dict] | None = None, character: dict | None = None, tool_choice=None,
                    response_format: dict | None = None,
                    adapter: str | None = None) -> Generator[tuple[str, Delta], None, list[ParsedOutput]]:
        """Yield (display text delta, engine delta) for one conversation; closing the iterator aborts it. The
        generator returns (StopIteration.value, or `parsed = yield from ...`) each choice's final parse: its
        content and tool calls."""
        prompt = self.chat_serving.render(messages, tools, character, tool_choice, response_format=response_format)
        params, = self._for_adapter([params or SamplingParams()], adapter)
        params = self.chat_serving.sampling_params(params, prompt, self.engine.max_model_len)
        streams = [self.chat_serving.stream(prompt) for _ in range(params.n)]
        deltas = self._deltas([(prompt.prompt_ids, params, uuid.uuid4().hex)])
        try:
            for d in deltas:
                yield streams[d.index].feed(d.token_ids, d.finished), d
        finally:
            deltas.close()
        return [s.result for s in streams]

    @staticmethod
    def _params_list(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(count)]
        if isinstance(params, SamplingParams):
            return [params] * count
        if len(params) != count:
            raise InvalidParameterError("params", f"{len(params)} items", f"must match the {count} prompts")
        return list(params)
