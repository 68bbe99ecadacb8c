"""AsyncLLMEngine: one background thread owns the LLMEngine (and so the device) and steps it while there is
work; asyncio handlers only enqueue commands and read their own queue of deltas.

Leaving a `generate()` stream early (client gone, task cancelled) aborts the request, freeing its KV blocks at
once. If a step fails, the requests of that moment get the error and the loop keeps serving new ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from typing import AsyncIterator

from .llm_engine import LLMEngine
from .outputs import Delta
from .sampling_params import SamplingParams

log = logging.getLogger("glmkit")


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="glmkit-engine", daemon=True)
        self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Yield the request's deltas until every choice has finished. Bad input raises before anything runs."""
        self.engine.validate(prompt_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            from ..errors import InvalidParameterError

            raise InvalidParameterError("request_id", request_id, "is already in use by a running request")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", prompt_ids, params, request_id))
        remaining = params.n
        try:
            while remaining:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self._send(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    # -- the engine thread ---------------------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        entry = self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                self._commands.put(("abort", request_id))

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, prompt_ids, params, request_id = command
                if request_id not in self._streams:  # cancelled before it started
                    continue
                try:
                    self.engine.add_request(prompt_ids, params, request_id)
                except Exception as e:  # noqa: BLE001 - the error belongs to this request alone
                    self._deliver(request_id, e)
            else:
                self.engine.abort(command[1])

    def _loop(self) -> None:
        while not self._stopping:
            self._run_commands()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                deltas = self.engine.step()
            except Exception as e:  # noqa: BLE001 - keep serving; fail only the requests of this moment
                log.exception("engine step failed; failing the %d requests in flight", len(self.engine.seqs))
                for request_id in list(self.engine.seqs):
                    self.engine.abort(request_id)
                    self._deliver(request_id, RuntimeError(f"engine step failed ({type(e).__name__}: {e})"))
                continue
            for delta in deltas:
                self._deliver(delta.request_id, delta)
