"""Relaying an upstream event stream: whole SSE events, as they arrive, under deadlines.

Bytes are passed on unchanged, but only in whole events (split on the blank
line), so a stream that breaks mid-event never leaves half an event before the
error. The relay ends in exactly one of two ways: the upstream's `data: [DONE]`,
or an SSE error event (`upstream_timeout` when the upstream stalls past the idle
or total deadline, `upstream_stream_error` when it fails or stops before
`[DONE]`), after which nothing follows. Framework-free; asyncio only (the proxy's
server and upstream transport).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import anyio
import httpx

from railproxy import respond

MAX_EVENT_BYTES = 1024 * 1024
# An event ends at a blank line; a line may end in CRLF, LF or CR (the SSE spec).
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\r\n|\r\n\n|\n\n|\r\r")


async def next_chunk(chunks: AsyncIterator[bytes], seconds: float) -> bytes:
    """The next chunk within `seconds`; TimeoutError otherwise (asyncio only)."""
    async with asyncio.timeout(seconds):
        return await anext(chunks)


def is_done(event: bytes) -> bool:
    return event.strip().replace(b" ", b"") == b"data:[DONE]"


class StreamFailed(Exception):
    """The stream broke before its first event; `code` names how."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class Relay:
    """One upstream event stream. Use `prime()`, then `events()`, then `aclose()`."""

    def __init__(
        self, response: httpx.Response, *, idle: float, deadline: Callable[[], float]
    ) -> None:
        self.response = response
        self.outcome = "open"  # completed, upstream_timeout, upstream_stream_error, client_abort
        self._chunks = response.aiter_bytes()
        self._idle = idle
        self._deadline = deadline
        self._buffer = b""
        self._ready: list[bytes] = []

    async def prime(self) -> None:
        """Read until the first whole event (the caller bounds the time)."""
        while not self._ready:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                raise StreamFailed(
                    "the upstream stream ended at once", "upstream_invalid_response"
                ) from None
            except httpx.HTTPError as exc:
                raise StreamFailed("the upstream connection broke", "upstream_error") from exc
            if not self._feed(chunk):
                raise StreamFailed(
                    "the upstream sent an event that is too large", "upstream_invalid_response"
                )

    async def events(self) -> AsyncGenerator[bytes, None]:
        """Whole events, ending with `[DONE]` or an error event. Never raises on upstream faults."""
        while True:
            while self._ready:
                event = self._ready.pop(0)
                yield event
                if is_done(event):
                    self.outcome = "completed"
                    return
            failure = await self._refill()
            if failure is not None:
                yield failure
                return

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self.response.aclose()

    async def _refill(self) -> bytes | None:
        """Read one more chunk; the error event to end with, if the stream failed."""
        left = self._deadline()
        try:
            chunk = await next_chunk(self._chunks, min(self._idle, left))
        except TimeoutError:
            self.outcome = "upstream_timeout"
            what = "total deadline" if left <= self._idle else f"no data for {self._idle:g} s"
            return respond.sse_error(
                f"the upstream stream stalled ({what})", code="upstream_timeout"
            )
        except StopAsyncIteration:
            return self._broken("the upstream stream ended before [DONE]")
        except httpx.HTTPError:
            return self._broken("the upstream connection broke mid-stream")
        if not self._feed(chunk):
            return self._broken("the upstream sent an event that is too large")
        return None

    def _broken(self, message: str) -> bytes:
        self.outcome = "upstream_stream_error"
        return respond.sse_error(message, code="upstream_stream_error")

    def _feed(self, chunk: bytes) -> bool:
        """Split buffered bytes into whole events; False if one grows too large."""
        self._buffer += chunk
        while match := _BOUNDARY.search(self._buffer):
            if match.end() > MAX_EVENT_BYTES:  # a whole event can arrive in one chunk
                return False
            self._ready.append(self._buffer[: match.end()])
            self._buffer = self._buffer[match.end() :]
        return len(self._buffer) <= MAX_EVENT_BYTES
