"""Connections: uvicorn's HTTP/1.1 protocol with the two guards it lacks. A connection must deliver a request's
headers within `read_timeout_s` of opening (or of its first byte after a finished response), else it is closed
with a 408: a client that opens a socket and sends nothing, or headers one byte at a time, holds nothing for
long. Past `max_connections` open connections a new one is answered 503 at once and closed. (The body's own
deadline and size are limits.BodyLimit's; idle keep-alive connections close after uvicorn's keep-alive timeout.)
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body
from .limits import Limits


def guarded_protocol(limits: Limits) -> type[H11Protocol]:
    """The protocol class for uvicorn.Config(http=...), holding these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def _raw_response(status: str, message: str, code: str) -> bytes:
    body = json.dumps(error_body(message, "server_error" if status.startswith("503") else "invalid_request_error",
                                 None, code)).encode()
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n" + ("retry-after: 1\r\n" if status.startswith("503") else "") + "\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    limits: Limits

    def connection_made(self, transport) -> None:
        self._header_timer = None
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.write(_raw_response("503 Service Unavailable", f"the server has {self.limits.max_connections} "
                                          "open connections (--max-connections); retry shortly", "too_many_connections"))
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:      # a request's headers arrived
            self._disarm()
        elif self._waiting_for_headers() and self._header_timer is None:
            self._arm()                   # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.read_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.write(_raw_response("408 Request Timeout", "the request's headers did not arrive within "
                                               f"{self.limits.read_timeout_s:g}s (--read-timeout)", "request_timeout"))
            self.transport.close()
