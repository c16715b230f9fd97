"""A deadline for a request's line and headers: uvicorn's HTTP protocol that answers 408 and closes a connection
whose request headers have begun but not all arrived in time, and closes one that sent nothing in that time.

uvicorn times out neither a request's headers nor a new connection that sends nothing complete: a client that
sends a header line every few seconds (slowloris) holds a connection, and a server process's file descriptors,
for as long as it likes. The request body has its own deadline (``RequestBodyMiddleware`` in
:mod:`~vpt_lightning.serving.server`); this protocol covers what comes before it, as nginx's
``client_header_timeout`` does. It subclasses the protocol uvicorn picks itself (``httptools`` when installed, else
``h11``); both parse synchronously in ``data_received`` and open a request cycle once the headers are complete.
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

from uvicorn.protocols.http.auto import AutoHTTPProtocol

#: seconds a client has for its request headers, and then for its body (``vpt-serve --read-timeout``)
DEFAULT_READ_TIMEOUT = 30.0


class HeaderDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with a deadline of :attr:`header_timeout` seconds for the request line and headers,
    counted from the connection's opening and again from the end of each response (keep-alive): a request begun
    but not complete by then gets a 408; a connection that sent nothing is closed without an answer."""

    header_timeout: float = DEFAULT_READ_TIMEOUT  # set by vpt_lightning.serving.server.serve from --read-timeout

    _header_deadline: Optional[asyncio.TimerHandle] = None
    _request_bytes = 0  # bytes received since the deadline was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        self._request_bytes += len(data)
        super().data_received(data)
        # headers complete, or the connection upgraded (a WebSocket: another protocol owns the transport now)
        if self._headers_received() or self.transport.get_protocol() is not self:
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._headers_received():
            self._arm_header_deadline()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _headers_received(self) -> bool:
        """Whether a request's headers are complete and its response is not (a request cycle is open)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._request_bytes = 0
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self._headers_received():
            return
        if not self._request_bytes:  # an idle connection: closed without an answer, as a keep-alive timeout does
            self.transport.close()
            return
        body = json.dumps({"detail": f"request headers not received within {self.header_timeout:g} s"}).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        self.transport.close()
