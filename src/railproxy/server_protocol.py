"""uvicorn's HTTP/1.1 protocol with a deadline for request headers (slowloris).

Built on uvicorn's httptools protocol: its C parser costs about 0.2 ms less per
request than h11 on a 2-core host (bench/perf.py), and every request pays it.

uvicorn times out an idle keep-alive connection, but not one that is sending its
request line and headers slowly: any byte cancels the keep-alive timer, so a
client dripping one header byte at a time holds a connection (and a slot of
`max_in_flight`'s budget of sockets) for ever. Here every request's headers
must be complete within `client_header` seconds of the connection opening or of
the previous response ending, and so must the rest of a body that the app
answered without reading; otherwise the connection is closed. Bodies the app
reads have their own deadline (`client_body`, answered 408 by `intake`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def header_deadline_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """A uvicorn protocol class whose connections must send whole headers within `seconds`."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        # Armed whenever the connection waits on the client with no request in the app:
        # for a request's headers, or for the rest of a body the app answered without
        # reading (an early 401/413/415/503). Never while the app handles a request.
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._update()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._update()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update()

        def _in_app(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _update(self) -> None:
            if self._in_app():
                self._disarm()
            elif self._header_timer is None and not self.transport.is_closing():
                # Not re-armed by later bytes: a deadline, not an idle timeout.
                self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self._in_app() and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
