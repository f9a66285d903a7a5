"""The lean HTTP/1.1 transport against real sockets: framing, reuse, limits, failures, TLS.

Each test runs a scripted asyncio server on 127.0.0.1 that reads one request at a
time and answers with exact bytes, so every framing and error case is what a real
(or broken) upstream would put on the wire.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import trustme

from railproxy.http1 import MAX_HEAD_BYTES, Http1Transport

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{"ok": true}'

# answer(request_number, reader, writer): write the response (or misbehave)
Answer = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Server:
    port: int
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


@asynccontextmanager
async def serving(
    answer: Answer, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    server = Server(0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        try:
            while True:
                try:
                    request = await read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                server.requests.append(request)
                await answer(len(server.requests), reader, writer)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


def respond(data: bytes) -> Answer:
    async def answer(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)

    return answer


async def fetch(transport: Http1Transport, url: str, body: bytes = b'{"q": 1}') -> httpx.Response:
    request = httpx.Request("POST", url, content=body, headers={"content-type": "application/json"})
    response = await transport.handle_async_request(request)
    try:
        await response.aread()
    finally:
        await response.aclose()
    return response


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


# ---- framing


def test_a_sized_response_is_read_and_the_connection_reused() -> None:
    async def test() -> None:
        async with serving(respond(OK)) as server:
            transport = Http1Transport(max_connections=4)
            for _ in range(3):
                response = await fetch(transport, server.url)
                assert response.status_code == 200
                assert response.json() == {"ok": True}
                assert response.headers["content-type"] == "application/json"
            assert server.connections == 1  # kept alive and reused
            await transport.aclose()

    run(test)


def test_the_request_is_sent_as_given() -> None:
    async def test() -> None:
        async with serving(respond(OK)) as server:
            transport = Http1Transport(max_connections=1)
            request = httpx.Request(
                "POST",
                server.url + "?a=1",
                content=b"hello",
                headers={"authorization": "Bearer k", "user-agent": "railproxy/0.1"},
            )
            response = await transport.handle_async_request(request)
            await response.aclose()
            sent = server.requests[0]
            head, _, body = sent.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            assert lines[0] == b"POST /v1/chat/completions?a=1 HTTP/1.1"
            assert sorted(lines[1:]) == sorted(
                [
                    f"Host: 127.0.0.1:{server.port}".encode(),
                    b"authorization: Bearer k",
                    b"user-agent: railproxy/0.1",
                    b"Content-Length: 5",
                ]
            )
            assert body == b"hello"
            await transport.aclose()

    run(test)


def test_a_chunked_response_is_decoded_as_it_arrives() -> None:
    release = asyncio.Event()

    async def answer(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
            b"6;ext=1\r\ndata: \r\n"
        )
        await writer.drain()
        await release.wait()  # the first chunk must reach the client before the rest exists
        writer.write(b"3\r\none\r\n2\r\n\n\n\r\n0\r\nx-trailer: dropped\r\n\r\n")

    async def test() -> None:
        async with serving(answer) as server:
            transport = Http1Transport(max_connections=1)
            request = httpx.Request("POST", server.url, content=b"{}")
            response = await transport.handle_async_request(request)
            parts = response.aiter_raw()
            assert await anext(parts) == b"data: "
            release.set()
            rest = b"".join([part async for part in parts])
            assert rest == b"one\n\n"
            await response.aclose()
            assert (await fetch(transport, server.url)).status_code == 200
            assert server.connections == 1  # a fully read chunked body leaves it reusable
            await transport.aclose()

    run(test)


def test_a_body_that_ends_at_close_is_read_and_not_reused() -> None:
    async def answer(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{"a": 1}')
        await writer.drain()
        writer.close()

    async def test() -> None:
        async with serving(answer) as server:
            transport = Http1Transport(max_connections=1)
            assert (await fetch(transport, server.url)).json() == {"a": 1}
            assert (await fetch(transport, server.url)).json() == {"a": 1}
            assert server.connections == 2
            await transport.aclose()

    run(test)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0", "length-and-chunked"],
)
def test_connections_the_server_will_not_keep_are_not_reused(head: bytes) -> None:
    async def test() -> None:
        async with serving(respond(head)) as server:
            transport = Http1Transport(max_connections=1)
            for _ in range(2):
                assert (await fetch(transport, server.url)).json() == {}
            assert server.connections == 2
            await transport.aclose()

    run(test)


def test_interim_responses_are_skipped() -> None:
    async def test() -> None:
        async with serving(respond(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server:
            transport = Http1Transport(max_connections=1)
            response = await fetch(transport, server.url)
            assert (response.status_code, response.json()) == (200, {"ok": True})
            await transport.aclose()

    run(test)


def test_error_statuses_come_back_as_responses() -> None:
    data = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 2\r\n\r\n{}"

    async def test() -> None:
        async with serving(respond(data)) as server:
            transport = Http1Transport(max_connections=1)
            response = await fetch(transport, server.url)
            assert response.status_code == 429
            assert response.headers["retry-after"] == "7"
            assert response.extensions["reason_phrase"] == b"Too Many Requests"
            await transport.aclose()

    run(test)


# ---- broken upstreams: a protocol error, never a wrong answer


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 200 OK\r\ncontent-length: 2\r\n\r\n{}",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n folded: value\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-length: -2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
    ids=[
        "http2-status-line",
        "four-digit-status",
        "not-http",
        "obs-fold",
        "no-colon",
        "space-in-name",
        "nul-in-value",
        "conflicting-lengths",
        "negative-length",
        "hex-length",
        "unknown-coding",
        "bad-chunk-size",
        "missing-chunk-crlf",
        "switching-protocols",
    ],
)
def test_malformed_responses_are_protocol_errors(data: bytes) -> None:
    async def answer(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    async def test() -> None:
        async with serving(answer) as server:
            transport = Http1Transport(max_connections=1)
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(transport, server.url)
            # the slot was given back: the transport still works
            with pytest.raises(httpx.RemoteProtocolError):
                await fetch(transport, server.url)
            await transport.aclose()

    run(test)


def test_an_oversized_response_head_is_refused() -> None:
    huge = b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"

    async def test() -> None:
        async with serving(respond(huge)) as server:
            transport = Http1Transport(max_connections=1)
            with pytest.raises(httpx.RemoteProtocolError, match="too large"):
                await fetch(transport, server.url)
            await transport.aclose()

    run(test)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "without sending a response"),
        (b"HTTP/1.1 200 OK\r\ncontent-", "closed the connection early"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}", "closed the connection early"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nab", "early"),
    ],
    ids=["nothing", "half-a-head", "short-body", "short-chunk"],
)
def test_a_connection_closed_early_is_a_protocol_error(data: bytes, message: str) -> None:
    async def answer(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        writer.close()

    async def test() -> None:
        async with serving(answer) as server:
            transport = Http1Transport(max_connections=1)
            with pytest.raises(httpx.RemoteProtocolError, match=message):
                await fetch(transport, server.url)
            await transport.aclose()

    run(test)


def test_an_idle_connection_the_server_closed_is_replaced_not_failed() -> None:
    async def answer(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)
        await writer.drain()
        writer.close()  # after a keep-alive answer: the idle connection dies in the pool

    async def test() -> None:
        async with serving(answer) as server:
            transport = Http1Transport(max_connections=1)
            await fetch(transport, server.url)
            await asyncio.sleep(0.05)  # the close reaches the pooled connection
            assert (await fetch(transport, server.url)).status_code == 200
            assert server.connections == 2
            await transport.aclose()

    run(test)


def test_idle_connections_expire() -> None:
    async def test() -> None:
        async with serving(respond(OK)) as server:
            transport = Http1Transport(max_connections=1, keepalive_expiry=0.05)
            await fetch(transport, server.url)
            await asyncio.sleep(0.1)
            await fetch(transport, server.url)
            assert server.connections == 2
            await transport.aclose()

    run(test)


def test_unsolicited_bytes_make_a_pooled_connection_unusable() -> None:
    async def answer(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")  # one too many

    async def test() -> None:
        async with serving(answer) as server:
            transport = Http1Transport(max_connections=1)
            await fetch(transport, server.url)
            await asyncio.sleep(0.05)
            assert (await fetch(transport, server.url)).json() == {"ok": True}
            assert server.connections == 2  # the extra answer was never read as the next one
            await transport.aclose()

    run(test)


# ---- connecting, limits, cancellation


def test_a_refused_connection_is_a_connect_error() -> None:
    async def test() -> None:
        async with serving(respond(OK)) as server:
            url = server.url
        transport = Http1Transport(max_connections=1)
        with pytest.raises(httpx.ConnectError):
            await fetch(transport, url)
        await transport.aclose()

    run(test)


def test_at_most_max_connections_are_in_use() -> None:
    async def test() -> None:
        async with serving(respond(OK)) as server:
            transport = Http1Transport(max_connections=1)
            held = await transport.handle_async_request(httpx.Request("POST", server.url))
            request = httpx.Request(
                "POST", server.url, extensions={"timeout": {"pool": 0.1, "connect": 5}}
            )
            with pytest.raises(httpx.PoolTimeout):
                await transport.handle_async_request(request)
            await held.aclose()  # frees the slot
            assert (await fetch(transport, server.url)).status_code == 200
            await transport.aclose()

    run(test)


def test_a_request_cancelled_while_waiting_drops_its_connection() -> None:
    async def hang(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if n == 1:
            await asyncio.sleep(3600)
        writer.write(OK)

    async def test() -> None:
        async with serving(hang) as server:
            transport = Http1Transport(max_connections=1)
            pending = asyncio.create_task(fetch(transport, server.url))
            await asyncio.sleep(0.1)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            # the slot is free and the half-used connection was not reused
            assert (await fetch(transport, server.url)).status_code == 200
            assert server.connections == 2
            await transport.aclose()

    run(test)


def test_a_response_closed_before_its_end_drops_the_connection() -> None:
    big = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 1_000_000

    async def test() -> None:
        async with serving(respond(big)) as server:
            transport = Http1Transport(max_connections=1)
            response = await transport.handle_async_request(httpx.Request("POST", server.url))
            await anext(response.aiter_raw())
            await response.aclose()
            await asyncio.sleep(0.05)
            assert len((await fetch(transport, server.url)).content) == 1_000_000
            assert server.connections == 2
            await transport.aclose()

    run(test)


def test_read_timeouts_are_enforced_when_set() -> None:
    async def hang(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    async def test() -> None:
        async with serving(hang) as server:
            transport = Http1Transport(max_connections=1)
            request = httpx.Request("POST", server.url, extensions={"timeout": {"read": 0.1}})
            with pytest.raises(httpx.ReadTimeout):
                await transport.handle_async_request(request)
            await transport.aclose()

    run(test)


@pytest.mark.parametrize(
    "headers",
    [{"x-evil": "a\r\nx-injected: 1"}, {"x-evil": "a\nb"}],
    ids=["crlf", "lf"],
)
def test_header_injection_is_refused_before_sending(headers: dict[str, str]) -> None:
    async def test() -> None:
        async with serving(respond(OK)) as server:
            transport = Http1Transport(max_connections=1)
            request = httpx.Request("POST", server.url, headers=headers)
            with pytest.raises(httpx.LocalProtocolError):
                await transport.handle_async_request(request)
            assert server.requests == []
            assert (await fetch(transport, server.url)).status_code == 200  # slot not leaked
            await transport.aclose()

    run(test)


def test_other_schemes_are_refused() -> None:
    async def test() -> None:
        transport = Http1Transport(max_connections=1)
        with pytest.raises(httpx.UnsupportedProtocol):
            await transport.handle_async_request(httpx.Request("POST", "ftp://127.0.0.1/x"))

    run(test)


# ---- TLS


def _tls_server(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


def test_https_verifies_the_upstream_certificate() -> None:
    ca = trustme.CA()

    async def test() -> None:
        async with serving(respond(OK), ssl_context=_tls_server(ca)) as server:
            url = f"https://localhost:{server.port}/v1/chat/completions"
            trusting = ssl.create_default_context()
            ca.configure_trust(trusting)
            transport = Http1Transport(max_connections=1, ssl_context=trusting)
            for _ in range(2):
                assert (await fetch(transport, url)).json() == {"ok": True}
            assert server.connections == 1
            await transport.aclose()

            default = Http1Transport(max_connections=1)  # httpx's trust store: not our CA
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(default, url)

            wrong_name = Http1Transport(max_connections=1, ssl_context=trusting)
            with pytest.raises(httpx.ConnectError):
                await fetch(wrong_name, f"https://127.0.0.1:{server.port}/v1/chat/completions")

    run(test)
