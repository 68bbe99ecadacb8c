"""AsyncLLMEngine: one background thread owns the LLMEngine (and so the device) and steps it while there is
work; every other thread only sends commands and reads the deltas of its own requests.

Callers: asyncio handlers (`generate`, an async iterator), plain threads (`stream`, e.g. `LLM.chat` on an LLM
whose engine is being served), and `call`, which runs a function on the engine thread (a consistent stats
snapshot). Leaving a stream early (client gone, task cancelled, iterator closed) aborts the request, freeing
its KV blocks at once. If a step fails, the requests of that moment get the error and the loop keeps serving.
The loop stamps a heartbeat each turn, so a watcher can tell a stuck step or a dead thread from a busy engine;
`abort_all` ends every request with one error (a server shutting down), and a stopped or dead loop fails the
requests it leaves behind instead of letting their callers wait forever.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
import time
import uuid
from typing import AsyncIterator, Callable, Iterator

from ..errors import InvalidParameterError
from .llm_engine import LLMEngine
from .outputs import Delta
from .sampling_params import SamplingParams

log = logging.getLogger("glmkit")

Sink = Callable[[object], None]  # called on the engine thread with each Delta, or the exception that ends it


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._refusal: BaseException | None = None  # set by abort_all or a dead loop: every new request gets it
        self.heartbeat = time.monotonic()            # stamped by the loop each turn (time.monotonic())
        self._idle = True                            # the loop waits for work (a stale heartbeat is fine then)
        self._thread = threading.Thread(target=self._run, name="glmkit-engine", daemon=True)
        self._thread.start()

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The error a request would get; reads only the engine's fixed limits, so safe from any thread."""
        self.engine.validate(prompt_ids, params)

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sink: Sink) -> None:
        """Start a request whose deltas go to `sink` (on the engine thread). Bad input raises here, at once."""
        self.validate(prompt_ids, params)
        if self._refusal is not None:
            raise copy.copy(self._refusal)
        if request_id in self._sinks:
            raise InvalidParameterError("request_id", request_id, "is already in use by a running request")
        self._sinks[request_id] = sink
        self._send(("add", prompt_ids, params, request_id))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; its sink hears nothing more."""
        self._sinks.pop(request_id, None)
        self._send(("abort", request_id))

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[Delta]:
        """Yield the request's deltas until every choice has finished. Bad input raises before anything runs."""
        request_id = request_id or uuid.uuid4().hex
        if params.structured is not None:  # compile a new grammar on a worker thread, not on the event loop
            await asyncio.to_thread(self.engine.grammars.check, params.structured)
        loop, stream = asyncio.get_running_loop(), asyncio.Queue()
        self.add(prompt_ids, params, request_id, lambda item: loop.call_soon_threadsafe(stream.put_nowait, item))
        remaining = params.n
        try:
            while remaining:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                remaining -= item.finished
                yield item
        finally:
            self._close(request_id, remaining)

    def stream(self, requests: list[tuple[list[int], SamplingParams, str]]) -> Iterator[Delta]:
        """The deltas of several requests, for a thread that is not an event loop, until every choice of every
        request has finished; closing the iterator aborts the unfinished ones."""
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        remaining = {}
        try:
            for prompt_ids, params, request_id in requests:
                self.add(prompt_ids, params, request_id, inbox.put)
                remaining[request_id] = params.n
            while any(remaining.values()):
                item = inbox.get()
                if isinstance(item, BaseException):
                    raise item
                remaining[item.request_id] -= item.finished
                yield item
        finally:
            for request_id, left in remaining.items():
                self._close(request_id, left)

    def call(self, fn: Callable[[LLMEngine], object]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread, between steps; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._thread.is_alive():  # nobody would ever answer
            future.set_exception(copy.copy(self._refusal or RuntimeError("the engine is not running")))
            return future
        self._send(("call", fn, future))
        return future

    def abort_all(self, error: BaseException) -> None:
        """End every request (running, queued, or added from now on) with `error`, freeing their blocks."""
        self._refusal = error
        self._send(("abort_all", error))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled_s(self) -> float:
        """Seconds the loop has spent in its current turn while it has work (0 while it waits for work)."""
        return 0.0 if self._idle else time.monotonic() - self.heartbeat

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop after its current step; requests still running get an error."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    def _close(self, request_id: str, remaining: int) -> None:
        if remaining:
            self.abort(request_id)
        else:
            self._sinks.pop(request_id, None)

    # -- the engine thread ---------------------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        sink = self._sinks.get(request_id)
        if sink is not None:
            try:
                sink(item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                self.abort(request_id)

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, prompt_ids, params, request_id = command
                if request_id not in self._sinks:  # cancelled before it started
                    continue
                try:
                    self.engine.add_request(prompt_ids, params, request_id)
                except Exception as e:  # noqa: BLE001 - the error belongs to this request alone
                    self._deliver(request_id, e)
            elif command[0] == "call":
                _, fn, future = command
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
            elif command[0] == "abort_all":
                self._fail_all(command[1])
            else:
                self.engine.abort(command[1])

    def _fail_all(self, error: BaseException) -> None:
        for request_id in set(self.engine.seqs) | set(self._sinks):
            self.engine.abort(request_id)
            self._deliver(request_id, copy.copy(error))
            self._sinks.pop(request_id, None)

    def _run(self) -> None:
        try:
            self._loop()
            error = RuntimeError("the engine was stopped")
        except BaseException as e:  # noqa: BLE001 - the thread ends; nobody may wait on it any more
            log.exception("the engine loop died")
            error = RuntimeError(f"the engine loop died ({type(e).__name__}: {e})")
        self._refusal = error
        try:
            self._run_commands()  # answer calls and adds sent just before the end
            self._fail_all(error)
        except Exception:  # noqa: BLE001 - the engine itself is broken; still free the callers
            for request_id in list(self._sinks):
                self._deliver(request_id, copy.copy(error))
            self._sinks.clear()

    def _loop(self) -> None:
        while not self._stopping:
            self.heartbeat = time.monotonic()
            self._run_commands()
            if not self.engine.has_unfinished():
                self._idle = True
                self._wake.wait()
                self._wake.clear()
                self.heartbeat = time.monotonic()  # before leaving idle: a watcher never sees a stale stamp
                self._idle = False
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
