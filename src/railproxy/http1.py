"""A lean HTTP/1.1 transport for httpx: the upstream hop without httpcore's overhead.

httpx's default transport (httpcore + h11) costs about 0.5 ms of CPU per request
on the 2-core reference host, several times what the upstream round trip itself
costs on loopback (`bench/perf.py`, `bench/README.md`). railproxy sends one kind of
request to one origin, so it needs a small, strict subset of HTTP/1.1:

- requests with a body of known length (`content-length`), written in one go;
- responses framed by `content-length`, `transfer-encoding: chunked` or the end of
  the connection; interim 1xx responses skipped;
- a keep-alive pool per origin, at most `max_connections` in use at a time; a
  connection is reused only when its response was read to the end, the server did
  not ask to close it, and it is still open and silent when taken from the pool;
- plain TCP or TLS (httpx's own default SSL context: the same certificate checks).

Parsing is strict and bounded: a status line and header block of at most
`MAX_HEAD_BYTES`, no obsolete line folding, one consistent `content-length`,
`chunked` as the only transfer coding, chunk-size lines and trailers bounded
too. Anything else is an `httpx.RemoteProtocolError` and the connection is
dropped. Failures are raised as the httpx exceptions httpcore would raise
(ConnectError, ConnectTimeout, PoolTimeout, WriteError, ReadError, ReadTimeout,
RemoteProtocolError), so the caller maps them exactly as before. Nothing is
retried: a request that may have been sent fails. asyncio only.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

MAX_HEAD_BYTES = 64 * 1024  # status line + headers; also bounds chunk-size lines
MAX_TRAILER_LINES = 100
READ_SIZE = 64 * 1024
KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept; servers often close at 5-75 s

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_FORBIDDEN_IN_HEAD = re.compile(rb"[\x00\r\n]")

Origin = tuple[bytes, bytes, int]


class Http1Transport(httpx.AsyncBaseTransport):
    """httpx transport: HTTP/1.1 over asyncio streams, with a keep-alive pool."""

    def __init__(
        self,
        *,
        max_connections: int,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        port = url.port or (443 if url.scheme == "https" else 80)
        origin: Origin = (url.raw_scheme, url.raw_host, port)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        head = _request_head(request)
        body = await request.aread()
        await self._acquire(timeouts.get("pool"))
        connection: _Connection | None = None
        try:
            connection = self._take_idle(origin) or await self._connect(
                origin, timeouts.get("connect")
            )
            await connection.send(head + body, timeouts.get("write"))
            status, reason, headers, framing = await connection.read_head(timeouts.get("read"))
        except BaseException:  # also cancellation: a half-used connection is never reused
            if connection is not None:
                connection.abort()
            self._release()
            raise
        stream = _ResponseBody(self, origin, connection, framing, timeouts.get("read"))
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.abort()
        self._idle.clear()

    async def _acquire(self, limit: float | None) -> None:
        if self._slots is None:  # made on first use, inside the running loop
            self._slots = asyncio.Semaphore(self.max_connections)
        if not self._slots.locked():  # free: taken at once, no deadline to arm
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(limit):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection to the upstream became free in time") from None

    def _release(self) -> None:
        assert self._slots is not None
        self._slots.release()

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # most recent first: the least likely to be closed
            if connection.usable(now, self.keepalive_expiry):
                return connection
            connection.abort()
        return None

    def _put_idle(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self.max_connections:
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        idle.append(connection)

    async def _connect(self, origin: Origin, limit: float | None) -> _Connection:
        scheme, host, port = origin
        hostname = host.decode("ascii")
        context: ssl.SSLContext | None = None
        if scheme == b"https":
            if self._ssl_context is None:  # loading the CA bundle is slow: once per transport
                self._ssl_context = httpx.create_ssl_context()
            context = self._ssl_context
        try:
            async with asyncio.timeout(limit):
                reader, writer = await asyncio.open_connection(
                    hostname,
                    port,
                    ssl=context,
                    server_hostname=hostname if context else None,
                    limit=MAX_HEAD_BYTES,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {hostname}:{port} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {hostname}:{port}: {exc}") from exc
        return _Connection(reader, writer)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        """Open, silent (nothing unread, no EOF) and not idle for too long."""
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and not _buffered(self.reader)
            and now - self.idle_since < expiry
        )

    def abort(self) -> None:
        self.writer.transport.abort()

    async def send(self, data: bytes, limit: float | None) -> None:
        try:
            self.writer.write(data)
            async with asyncio.timeout(limit):
                await self.writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("writing the request to the upstream timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.WriteError(f"writing to the upstream failed: {exc}") from exc

    async def read_head(
        self, limit: float | None
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]], _Framing]:
        """The final response's status, reason, headers and body framing."""
        while True:
            block = await self._read(self.reader.readuntil(b"\r\n\r\n"), limit, head=True)
            status, reason, headers, minor = _parse_head(block)
            if status >= 200:
                return status, reason, headers, _framing(status, headers, minor)
            if status == 101:
                raise httpx.RemoteProtocolError("the upstream switched protocols")
            # 1xx interim response: the final one follows

    async def read_line(self, limit: float | None) -> bytes:
        return await self._read(self.reader.readuntil(b"\r\n"), limit, head=True)

    async def read_some(self, size: int, limit: float | None) -> bytes:
        return await self._read(self.reader.read(size), limit)

    async def read_exactly(self, size: int, limit: float | None) -> bytes:
        return await self._read(self.reader.readexactly(size), limit)

    @staticmethod
    async def _read(pending: Any, limit: float | None, *, head: bool = False) -> bytes:
        try:
            if limit is None:  # no deadline here (the caller keeps its own): nothing to arm
                data: bytes = await pending
                return data
            async with asyncio.timeout(limit):
                data = await pending
                return data
        except TimeoutError:
            raise httpx.ReadTimeout("reading from the upstream timed out") from None
        except asyncio.IncompleteReadError as exc:
            if head and not exc.partial:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response."
                ) from None
            raise httpx.RemoteProtocolError("the upstream closed the connection early") from None
        except (asyncio.LimitOverrunError, ValueError):
            raise httpx.RemoteProtocolError("the upstream's response head is too large") from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ReadError(f"reading from the upstream failed: {exc}") from exc


def _buffered(reader: asyncio.StreamReader) -> bool:
    buffer = getattr(reader, "_buffer", None)  # CPython's StreamReader; absent: assume clean
    return bool(buffer)


class _Framing:
    """How the body ends: `length` bytes, chunked, or at close (length None, chunked False)."""

    __slots__ = ("chunked", "keep_alive", "length")

    def __init__(self, *, length: int | None, chunked: bool, keep_alive: bool) -> None:
        self.length = length
        self.chunked = chunked
        self.keep_alive = keep_alive


def _request_head(request: httpx.Request) -> bytes:
    target = request.url.raw_path
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    for name, value in request.headers.raw:
        if not _TOKEN.fullmatch(name) or _FORBIDDEN_IN_HEAD.search(value):
            raise httpx.LocalProtocolError(f"invalid request header {name!r}")
        lines.append(name + b": " + value)
    if _FORBIDDEN_IN_HEAD.search(target):
        raise httpx.LocalProtocolError("invalid request target")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _parse_head(block: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]], int]:
    lines = block[:-4].split(b"\r\n")
    matched = _STATUS_LINE.fullmatch(lines[0])
    if matched is None:
        raise httpx.RemoteProtocolError("the upstream sent an invalid status line")
    minor, status, reason = int(matched[1]), int(matched[2]), matched[3] or b""
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also obs-fold: a line led by whitespace
            raise httpx.RemoteProtocolError("the upstream sent an invalid header line")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise httpx.RemoteProtocolError("the upstream sent an invalid header value")
        headers.append((name, value))
    return status, reason, headers, minor


def _framing(status: int, headers: list[tuple[bytes, bytes]], minor: int) -> _Framing:
    connection = _tokens(headers, b"connection")
    keep_alive = minor == 1 and b"close" not in connection
    if status in (204, 304):
        return _Framing(length=0, chunked=False, keep_alive=keep_alive)
    lengths = set(_tokens(headers, b"content-length"))
    codings = _tokens(headers, b"transfer-encoding")
    if codings:
        if codings != [b"chunked"]:
            raise httpx.RemoteProtocolError("the upstream used an unsupported transfer coding")
        # With both, the length is ignored (RFC 9112 6.3); never reuse such a connection.
        return _Framing(length=None, chunked=True, keep_alive=keep_alive and not lengths)
    if not lengths:
        return _Framing(length=None, chunked=False, keep_alive=False)  # ends at close
    length = lengths.pop()
    if lengths or not length.isdigit() or len(length) > 18:
        raise httpx.RemoteProtocolError("the upstream sent an invalid content-length")
    return _Framing(length=int(length), chunked=False, keep_alive=keep_alive)


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The comma-separated values of every `name` header, in order, lower-cased."""
    return [
        token.strip().lower()
        for key, value in headers
        if key.lower() == name
        for token in value.split(b",")
    ]


class _ResponseBody(httpx.AsyncByteStream):
    """The response body as it arrives; closing it returns or drops the connection."""

    def __init__(
        self,
        transport: Http1Transport,
        origin: Origin,
        connection: _Connection,
        framing: _Framing,
        limit: float | None,
    ) -> None:
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._framing = framing
        self._limit = limit
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None or self._complete:
            return
        framing, limit = self._framing, self._limit
        if framing.chunked:
            parts = _chunked(connection, limit)
        elif framing.length is not None:
            parts = _sized(connection, framing.length, limit)
        else:
            parts = _until_close(connection, limit)
        async for part in parts:
            yield part
        self._complete = True

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._complete and self._framing.keep_alive:
            self._transport._put_idle(self._origin, connection)
        else:
            connection.abort()
        self._transport._release()


async def _sized(connection: _Connection, length: int, limit: float | None) -> AsyncIterator[bytes]:
    left = length
    while left:
        data = await connection.read_some(min(left, READ_SIZE), limit)
        if not data:
            raise httpx.RemoteProtocolError("the upstream closed the connection early")
        left -= len(data)
        yield data


async def _chunked(connection: _Connection, limit: float | None) -> AsyncIterator[bytes]:
    while True:
        line = await connection.read_line(limit)
        matched = _CHUNK_SIZE.fullmatch(line[:-2])
        if matched is None:
            raise httpx.RemoteProtocolError("the upstream sent an invalid chunk size")
        size = int(matched[1], 16)
        if size == 0:
            break
        async for data in _sized(connection, size, limit):
            yield data
        if await connection.read_exactly(2, limit) != b"\r\n":
            raise httpx.RemoteProtocolError("the upstream sent a malformed chunk")
    for _ in range(MAX_TRAILER_LINES):  # trailers are read and dropped
        if await connection.read_line(limit) == b"\r\n":
            return
    raise httpx.RemoteProtocolError("the upstream sent too many trailer lines")


async def _until_close(connection: _Connection, limit: float | None) -> AsyncIterator[bytes]:
    while data := await connection.read_some(READ_SIZE, limit):
        yield data
