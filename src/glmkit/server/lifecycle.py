"""Graceful shutdown: on SIGTERM or SIGINT the server stops admitting work (new requests get 503, the socket stays
open so clients hear that rather than a refused connection), lets running requests and streams finish for up to
`shutdown_timeout_s`, then aborts what is left: the engine fails those requests with `ServerShuttingDown`, which
streams report as a final in-band error event and waiting requests as a 503, and frees their KV blocks. Then the
engine thread stops and the process exits 0. A second signal skips the wait.

`GlmkitServer` replaces uvicorn's own signal handling (close the socket at once, then wait for connections
without limit); uvicorn still does the final close. Knows uvicorn and ServerState, nothing of the routes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

from .errors import ServerShuttingDown
from .state import ServerState

log = logging.getLogger("glmkit")

ABORT_GRACE_S = 5.0          # after the abort: time for streams to send their error event and close
FORCED_GRACE_S = 1.0         # the same after a second signal
ENGINE_STOP_S = 10.0         # the engine's current step may still be running


class GlmkitServer(uvicorn.Server):
    """uvicorn's server with a drain in place of its shutdown-on-signal. `exit_code` is what the process should
    return: 0, or 130 when a second Ctrl-C cut the drain short."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout_s: float):
        super().__init__(config)
        self.state, self.shutdown_timeout_s = state, shutdown_timeout_s
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forced: asyncio.Event | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop, self._forced = asyncio.get_running_loop(), asyncio.Event()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # A signal handler: runs between two bytecodes of the event loop's thread, so it only hands over.
        # Not recorded in uvicorn's _captured_signals: uvicorn would raise it again at the end (exit -15).
        if self._loop is None or not self.started:  # still starting: stop as uvicorn would
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if not self.state.draining:
            self.state.draining = True
            self._drain_task = asyncio.ensure_future(self.drain(name))
        elif not self._forced.is_set():
            log.info("glmkit: %s again: stopping now", name)
            if sig == signal.SIGINT:
                self.exit_code = 130
            self._forced.set()

    async def drain(self, reason: str = "shutdown") -> None:
        """Wait for running requests (at most shutdown_timeout_s), abort the rest, stop the engine, exit."""
        try:
            await self._drain(reason)
        except Exception:  # noqa: BLE001 - a bug here must not keep the process alive
            log.exception("glmkit: the drain failed; stopping now")
        finally:
            # Not force_exit, even after a second signal: it would skip the app's lifespan shutdown, whose task
            # then dies with a traceback. Nothing is left to wait for; uvicorn closes idle connections and returns.
            self.should_exit = True

    async def _drain(self, reason: str) -> None:
        state, start = self.state, time.monotonic()
        state.draining = True
        running = len(state.active)
        log.info("glmkit: %s: draining %d running request%s (up to %gs; send the signal again to stop at once)",
                 reason, running, "" if running == 1 else "s", self.shutdown_timeout_s)
        await self._wait_idle(self.shutdown_timeout_s)
        aborted = len(state.active)
        if aborted:
            for record in list(state.active):
                record.abort = record.abort or "shutdown"
            if state.client is not None:
                when = ("at once (a second signal)" if self._forced.is_set() else
                        f"after its {self.shutdown_timeout_s:g}s drain timeout")
                state.client.abort_all(ServerShuttingDown(f"the server is shutting down and aborted this request "
                                                          f"{when}; retry it"))
            await self._wait_idle(FORCED_GRACE_S if self._forced.is_set() else ABORT_GRACE_S, forced_ends=False)
        blocks = await self._kv_blocks_used()
        if state.client is not None:
            join_s = FORCED_GRACE_S if self._forced.is_set() else ENGINE_STOP_S
            await asyncio.to_thread(state.client.shutdown, join_s)
        log.info("glmkit: drained in %.1fs: %d finished, %d aborted, %d still open; KV blocks in use: %s; engine %s",
                 time.monotonic() - start, running - aborted, aborted, len(state.active),
                 "unknown" if blocks is None else blocks,
                 "stopped" if state.client is None or not state.client.alive else "did not stop")

    async def _wait_idle(self, timeout_s: float, forced_ends: bool = True) -> None:
        """Until no request runs, timeout_s passes, or (when forced_ends) a second signal comes."""
        deadline = time.monotonic() + timeout_s
        while self.state.active and time.monotonic() < deadline and not (forced_ends and self._forced.is_set()):
            await asyncio.sleep(0.05)

    async def _kv_blocks_used(self) -> int | None:
        client = self.state.client
        if client is None or not client.alive:
            return None
        try:
            snapshot = await asyncio.wait_for(client.snapshot(), 2.0)
        except Exception:  # noqa: BLE001 - a stuck or broken engine; the log line says "unknown"
            return None
        return int(snapshot.gauges.get("kv_blocks_used", 0))
