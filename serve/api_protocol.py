"""uvicorn's h11 HTTP protocol with two limits uvicorn lacks: a deadline for request headers and a connection cap.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but lets a client that sends its headers one
byte at a time hold a connection for as long as it likes (slowloris); `limit_concurrency` answers 503 per request
but still accepts every connection. Here a connection must deliver each request's complete headers within
`header_timeout` seconds of opening or of the previous response (else 408 and closed), and a connection beyond
`max_connections` gets a 503 and is closed. The check reads h11's public connection state (the client's
side is still `IDLE` until its headers are complete).

Every close the server starts is a lingering close (as nginx's `lingering_close`): the answer is followed by a
FIN, not a bare close, and what the client still sends is read and dropped until it has been silent for
`LINGER_IDLE_SECONDS`, at most `LINGER_MAX_SECONDS` in all (nginx's `lingering_timeout` and `lingering_time`).
A plain close with unread request bytes makes the kernel answer with a reset that can destroy the 408/413 the
client has not read yet; a client cut off mid-body would see "connection reset" instead of the reason. The
answer needs only to reach the client's kernel, so the bound is short: a slow client keeps its slot seconds,
not the half minute of nginx's default.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_IDLE_SECONDS = 2.0
LINGER_MAX_SECONDS = 5.0


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{retry}Connection: close\r\n\r\n"
    )
    return head.encode() + body.encode()


class LingeringTransport:
    """A connection's transport whose `close` half-closes and lingers (see the module docstring)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.lingering = False
        self.may_linger = True  # until the server stops: then every close is immediate
        self._linger_until = 0.0
        self._linger_timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self.transport.is_closing()

    def close(self) -> None:
        """Send what is buffered and a FIN, then close once the client closes or goes quiet (module docstring)."""
        if self.is_closing() or not self.may_linger or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.lingering = True
        self._linger_until = self.loop.time() + LINGER_MAX_SECONDS
        self.transport.write_eof()
        self.transport.resume_reading()
        self.client_was_heard()

    def forget(self) -> None:
        """The connection is gone: nothing left to close."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def client_was_heard(self) -> None:
        """While lingering: the client sent more, so wait for its silence again (within the overall limit)."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        delay = min(LINGER_IDLE_SECONDS, self._linger_until - self.loop.time())
        self._linger_timer = self.loop.call_later(max(delay, 0.0), self.transport.close)


class GuardedH11Protocol(H11Protocol):
    """`H11Protocol` plus the header deadline and the connection cap (see the module docstring)."""

    def __init__(self, *args: Any, header_timeout: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self.loop))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            message = f"the server has {self.max_connections} connections open, its limit; retry shortly"
            self._refuse(_raw_response(503, "Service Unavailable", message, "too_many_connections"))
            return
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:  # the client's bytes are read only to be dropped
            self.transport.client_was_heard()
        else:
            super().data_received(data)

    def shutdown(self) -> None:
        """The server is stopping: close at once, lingering included (it would hold the shutdown up)."""
        self.transport.may_linger = False
        if self.transport.lingering:  # its answer is sent; uvicorn's shutdown would answer it again
            self.transport.close()
            return
        super().shutdown()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        self.transport.forget()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # the headers arrived: the body deadline (BodyLimits) takes over
        message = f"the request headers did not arrive within {self.header_timeout:g} s"
        self._refuse(_raw_response(408, "Request Timeout", message, "request_timeout"))

    def _refuse(self, response: bytes) -> None:
        self.transport.write(response)
        self.transport.close()
