"""What the routes hold: an engine client. It offers generate/abort, validate, the context limit, a stats
snapshot, the tokenizer and the model's chat-serving layer, and nothing else of the engine; the server's
lifecycle also asks whether the engine is alive, how long its current step has run, and aborts everything.

`EngineClient` is the contract; `LocalEngineClient` implements it over a model loaded in this process, whose
engine it hands to a background thread (routes never touch the thread-owned LLMEngine). A client over a remote
engine (a replica behind a router) implements the same methods. Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol

from ..chat.serving import ChatServing
from ..engine.metrics import EngineSnapshot
from ..engine.outputs import Delta
from ..engine.sampling_params import SamplingParams
from ..tokenizers.base import Tokenizer


class EngineClient(Protocol):
    chat: ChatServing          # render / sampling params / stream display / parse for the model's chat format
    tokenizer: Tokenizer       # raw prompts of /v1/completions, logprob token texts
    max_model_len: int
    max_token_bytes: int       # the most text bytes one token spells (bounds a prompt's tokens from its text)
    vocab_size: int            # token ids are in [0, vocab_size)
    kv_tokens: int             # tokens the KV cache holds, all sequences together

    def encode_prompt(self, prompt: str | list[int]) -> list[int]: ...

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[Delta]: ...

    def abort(self, request_id: str) -> None: ...

    async def snapshot(self) -> EngineSnapshot: ...

    def abort_all(self, error: BaseException) -> None: ...

    def adapter_names(self) -> list[str]: ...

    def adapter_id(self, name: str) -> int | None: ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str, timeout_s: float = 30.0) -> None: ...

    @property
    def alive(self) -> bool: ...

    def stalled_s(self) -> float: ...

    def shutdown(self, timeout_s: float = 10.0) -> None: ...


class LocalEngineClient:
    def __init__(self, llm):
        self._llm = llm
        self._engine = llm.start_engine_thread()
        self.chat = llm.chat_serving
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.max_token_bytes = max((len(b) for b in llm.tokenizer.token_bytes() if b), default=1)
        self.vocab_size = llm.engine.vocab_size
        blocks = llm.engine.blocks
        self.kv_tokens = blocks.num_blocks * blocks.block_size

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self._llm.encode_prompt(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self._engine.validate(prompt_ids, params)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[Delta]:
        return self._engine.generate(prompt_ids, params, request_id)

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    async def snapshot(self) -> EngineSnapshot:
        """Gauges and counters taken on the engine thread between two steps."""
        return await asyncio.wrap_future(self._engine.call(lambda engine: engine.snapshot()))

    def abort_all(self, error: BaseException) -> None:
        """End every running request with `error` (their streams raise it) and refuse new ones."""
        self._engine.abort_all(error)

    def adapter_names(self) -> list[str]:
        """The adapters served beside the model, in the order they were loaded."""
        return list(self._llm.adapters)

    def adapter_id(self, name: str) -> int | None:
        """The engine id a request's SamplingParams.adapter_id takes for this adapter name (None: not loaded)."""
        return self._llm.adapters.get(name)

    async def load_adapter(self, name: str, path: str) -> None:
        """Read and load an adapter directory (on a worker thread; the engine takes it between two steps).
        Raises InvalidParameterError (name taken or malformed) or ModelLoadError (a bad or mismatched adapter)."""
        await asyncio.to_thread(self._llm.load_adapter, name, path)

    async def unload_adapter(self, name: str, timeout_s: float = 30.0) -> None:
        """Refuse new requests for it at once, wait for its running ones (up to timeout_s, else
        InvalidParameterError and it stays loaded), then free it."""
        await asyncio.to_thread(self._llm.unload_adapter, name, timeout_s)

    @property
    def alive(self) -> bool:
        return self._engine.alive

    def stalled_s(self) -> float:
        """Seconds the engine's current step has run (0 while it waits for work); cheap, from any thread."""
        return self._engine.stalled_s()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._engine.shutdown(timeout_s)
