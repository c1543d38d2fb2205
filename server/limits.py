"""Connection limits: how large a request may be, and how long a client may take to send it.

uvicorn reads headers and bodies for as long as a client cares to send them (one byte a second
keeps a connection, and its task, alive indefinitely: slowloris), and ``--request-timeout`` only
starts once a request is parsed. Here a client has ``--read-timeout`` seconds for its headers and
again for its body; past that it is answered 408 and its connection closes. Connection counts, TLS
and per-client rates belong to the reverse proxy in front (see docs/operate.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import h11
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .metrics import ServingMetrics
from .protocol import error_body

log = logging.getLogger(__name__)

_LINGER_S = 2.0  # how long a timed-out connection is still read (and dropped) before it closes


def read_timeout_protocol(seconds: float, on_timeout: Callable[[], None] = lambda: None) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol with read deadlines: a request's headers must be in within ``seconds``
    (from the connection's start, or from the first byte of a kept-alive connection's next request),
    and its body within ``seconds`` of its headers. Past either, the client gets a 408 error object
    and the connection closes; the request, if it had started, sees a disconnect."""

    class ReadTimeout(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _timed_out = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm("headers")

        def data_received(self, data: bytes) -> None:
            if self._timed_out:  # answered already: what still comes is read and dropped (see _linger)
                return
            if (self.cycle is None or self.cycle.response_complete) and self._timer is None:
                self._arm("headers")  # the next request on a kept-alive connection
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # its headers are in: now its body has the deadline
                self._arm("body")
            if self.cycle is not None and not self.cycle.more_body:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, what: str) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._too_slow, what)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self, what: str) -> None:
            self._timer = None
            cycle = self.cycle
            if self.transport.is_closing() or (cycle is not None and cycle.response_started
                                               and not cycle.response_complete):
                return  # it is being answered: the deadline was for reading it
            if cycle is not None and cycle.response_complete and self.conn.their_state is h11.SEND_BODY:
                # Answered before its body was read (a 413, a 401), and the rest still trickles in.
                log.info("closing a connection from %s: the rest of an answered request's body took over %g s",
                         self.client, seconds)
                self.transport.close()
                return
            log.info("closing a connection from %s: its request %s took over %g s", self.client, what, seconds)
            on_timeout()
            self._timed_out = True
            if cycle is not None and not cycle.response_complete:  # its handler, waiting for the body, sees a
                cycle.disconnected = True                              # disconnect
                cycle.message_event.set()
            message = f"the request's {what} did not arrive within this server's read timeout of {seconds:g} s"
            body = json.dumps(error_body(message, "invalid_request_error")).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            self._linger()

        def _linger(self) -> None:
            # Closing a socket with unread bytes sends a reset, which can destroy the 408 before the
            # client reads it: end our side first, drop what still arrives for a moment, then close.
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(_LINGER_S, self.transport.close)

    return ReadTimeout


class _TooLarge(StarletteHTTPException):
    """Raised from inside a body read; FastAPI passes HTTPExceptions on to the app's handler."""


class BodySizeLimit:
    """413 with an OpenAI error object for bodies over the limit, declared or streamed (chunked).

    Starlette's own limiter answers in plain text, which the OpenAI SDK cannot parse.
    """

    def __init__(self, app, max_bytes: int, metrics: ServingMetrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(413, self._message())
            return message

        async def watching_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _TooLarge:
            if started:
                raise
            await self._reject(scope, receive, send)

    def _message(self) -> str:
        return f"the request body is larger than this server's limit of {self.max_bytes} bytes"

    async def _reject(self, scope, receive, send):
        self.metrics.reject(413)
        body = error_body(self._message(), "invalid_request_error")
        await JSONResponse(body, status_code=413)(scope, receive, send)
