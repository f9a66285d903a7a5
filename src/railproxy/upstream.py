"""The upstream LLM: one httpx transport, explicit deadlines, a fixed error mapping.

Each request carries the upstream key, `content-type`, `accept`, a fixed
`user-agent` and what HTTP itself needs (host, content-length,
`accept-encoding: identity`). No client header and no cookie: requests go
straight to the transport (`http1.Http1Transport`, or the demo's), so there is no
cookie jar, no proxy or .netrc from the environment and no redirect to follow.
The URL is fixed at start-up. A request that was sent is never retried.
asyncio only, like the transport: deadlines are `asyncio.timeout`, about half
of the cost of an anyio cancel scope, and this path runs on every request.

| upstream                                   | client                                     |
|--------------------------------------------|--------------------------------------------|
| connection refused, reset, DNS, TLS        | 502 upstream_unavailable                   |
| no headers in time (connect or first byte) | 504 upstream_timeout                       |
| 429                                        | 429 rate_limit_exceeded, Retry-After kept  |
| 401 / 403                                  | 502 upstream_auth_failed                   |
| 5xx                                        | 502 upstream_error                         |
| 3xx, other 4xx                             | 502 upstream_invalid_response / _rejected  |
| 200 that is not JSON with `choices`, or    | 502 upstream_invalid_response              |
| not an event stream when streaming         |                                            |

Nothing else from the upstream's status line, headers or body reaches the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import anyio
import httpx

from railproxy import respond
from railproxy.errors import UpstreamError
from railproxy.http1 import Http1Transport
from railproxy.respond import Answer
from railproxy.settings import Timeouts
from railproxy.sse import Relay, StreamFailed

logger = logging.getLogger(__name__)

USER_AGENT = "railproxy/0.1"
WRITE_TIMEOUT = 10.0
MAX_RESPONSE_BYTES = 10 * 1024 * 1024
_RETRY_AFTER = re.compile(r"^[A-Za-z0-9 ,:.\-]{1,64}$")


class UpstreamFailure(UpstreamError):
    """An upstream failure, already mapped to what the client gets."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int = 502,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, status=status, retry_after=(headers or {}).get("retry-after"))
        self.code = code
        self.headers = dict(headers or {})

    def answer(self) -> Answer:
        return respond.error(self.status, str(self), code=self.code, headers=self.headers)


def timed_out(what: str) -> UpstreamFailure:
    return UpstreamFailure(
        f"the upstream did not answer in time ({what})", status=504, code="upstream_timeout"
    )


class Upstream:
    """Sends rebuilt bodies to `base_url + /chat/completions`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeouts: Timeouts,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self._url = httpx.URL(self.url)  # parsed once: parsing costs ~0.1 ms a request
        self.timeouts = timeouts
        auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # The same on every request: built once, by whether the answer is streamed.
        self._headers = {
            stream: httpx.Headers(
                {
                    **auth,
                    "content-type": "application/json",
                    "accept": "text/event-stream" if stream else "application/json",
                    "accept-encoding": "identity",
                    "user-agent": USER_AGENT,
                }
            )
            for stream in (False, True)
        }
        self._transport = transport or Http1Transport(max_connections=max_connections)
        self._timeouts = {
            "connect": timeouts.upstream_connect,
            "read": None,  # first-byte, idle and total deadlines are enforced here
            "write": WRITE_TIMEOUT,
            "pool": timeouts.upstream_connect,
        }

    def __repr__(self) -> str:
        return f"Upstream({self.url!r})"

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def complete(self, body: bytes) -> bytes:
        """Send a non-streaming request; the upstream's JSON bytes, checked."""
        response, deadline = await self._send(body, stream=False)
        chunks: list[bytes] = []
        size = 0
        idle = self.timeouts.upstream_stream_idle
        loop = asyncio.get_running_loop()
        try:
            # One timer for the whole body, re-armed by each chunk: the idle deadline
            # restarts with every chunk and never runs past the total deadline.
            async with asyncio.timeout(min(idle, deadline())) as timer:
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        raise _invalid("the upstream answer is too large")
                    chunks.append(chunk)
                    timer.reschedule(loop.time() + min(idle, deadline()))
        except TimeoutError as exc:
            raise timed_out("reading the answer") from exc
        except httpx.HTTPError as exc:
            raise UpstreamFailure("the upstream connection broke", code="upstream_error") from exc
        finally:
            await close(response)
        data = b"".join(chunks)
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
            raise _invalid("the upstream answer is not JSON") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("choices"), list):
            raise _invalid("the upstream answer is not a chat completion")
        return data

    async def open_stream(self, body: bytes) -> Relay:
        """Send a streaming request; a `Relay` that already holds the first event."""
        response, deadline = await self._send(body, stream=True)
        media = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "text/event-stream":
            await close(response)
            raise _invalid("the upstream did not answer with an event stream")
        relay = Relay(response, idle=self.timeouts.upstream_stream_idle, deadline=deadline)
        try:
            async with asyncio.timeout(min(self.timeouts.upstream_first_byte, deadline())):
                await relay.prime()
        except BaseException as exc:  # also cancellation: never leave the connection open
            await relay.aclose()
            if isinstance(exc, TimeoutError):
                raise timed_out("first event") from exc
            if isinstance(exc, StreamFailed):
                raise UpstreamFailure(str(exc), code=exc.code) from exc
            raise
        return relay

    async def _send(self, body: bytes, *, stream: bool) -> tuple[httpx.Response, Deadline]:
        request = httpx.Request(
            "POST",
            self._url,
            content=body,
            headers=self._headers[stream],
            extensions={"timeout": self._timeouts},
        )
        deadline = Deadline(self.timeouts.upstream_total)
        try:
            async with asyncio.timeout(min(self.timeouts.upstream_first_byte, deadline())):
                response = await self._transport.handle_async_request(request)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise timed_out("no response headers") from exc
        except httpx.HTTPError as exc:
            logger.warning("upstream unreachable: %s", type(exc).__name__)
            raise UpstreamFailure(
                "the upstream is unreachable", code="upstream_unavailable"
            ) from exc
        if response.status_code != 200:
            await close(response)
            raise _status_failure(response)
        return response, deadline


class Deadline:
    """Seconds left until a fixed moment; call it to read them."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def __call__(self) -> float:
        return max(0.0, self._end - time.monotonic())


async def close(response: httpx.Response) -> None:
    """Close a response even while being cancelled (the client went away)."""
    with anyio.CancelScope(shield=True):
        await response.aclose()


def _invalid(message: str) -> UpstreamFailure:
    return UpstreamFailure(message, code="upstream_invalid_response")


def _status_failure(response: httpx.Response) -> UpstreamFailure:
    status = response.status_code
    if status == 429:
        kept = {
            name: response.headers[name]
            for name in ("retry-after", "retry-after-ms")
            if _RETRY_AFTER.match(response.headers.get(name, ""))
        }
        return UpstreamFailure(
            "the upstream is rate limiting requests; retry later",
            status=429,
            code="rate_limit_exceeded",
            headers=kept,
        )
    no_retry = dict(respond.NO_RETRY)
    if status in (401, 403):
        logger.error("the upstream refused railproxy's API key (HTTP %d): check the key", status)
        return UpstreamFailure(
            "railproxy could not authenticate to the upstream",
            code="upstream_auth_failed",
            headers=no_retry,
        )
    logger.warning("the upstream answered HTTP %d", status)
    if status >= 500:
        return UpstreamFailure(f"the upstream failed (HTTP {status})", code="upstream_error")
    if 300 <= status < 400:
        return _invalid(f"the upstream answered with a redirect (HTTP {status})")
    return UpstreamFailure(
        f"the upstream rejected the request (HTTP {status})",
        code="upstream_rejected",
        headers=no_retry,
    )
