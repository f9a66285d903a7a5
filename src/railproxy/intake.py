"""A request body before parsing: content type, encoding, and a bounded read.

Framework-free (plain ASGI `receive`), so the proxy and the middleware enforce
the same limits: a non-JSON content type or any content-encoding is a 415, a
body over the limit is a 413 as soon as the limit is passed (never after
buffering it all), and a body that does not arrive in time is a 408.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio

from railproxy import respond
from railproxy.respond import Answer

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class Rejected(Exception):
    """The request is refused before parsing; `answer` says how."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


def check_headers(headers: Iterable[tuple[bytes, bytes]], *, max_bytes: int) -> None:
    """Refuse bodies railproxy will not read: wrong type, encoded, or declared too large."""
    found = {name.lower(): value.decode("latin-1") for name, value in headers}
    media, _, params = found.get(b"content-type", "").partition(";")
    charset = params.strip().lower().replace(" ", "")
    if media.strip().lower() != "application/json" or charset not in ("", "charset=utf-8"):
        raise Rejected(
            respond.error(
                415,
                "the request body must be JSON: send 'content-type: application/json'",
                code="unsupported_media_type",
            )
        )
    encoding = found.get(b"content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise Rejected(
            respond.error(
                415, "compressed request bodies are not accepted", code="unsupported_media_type"
            )
        )
    declared = found.get(b"content-length", "").strip()
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:  # not "²"
        raise Rejected(_too_large(max_bytes))


async def read_body(receive: Receive, *, max_bytes: int, time_limit: float) -> bytes:
    """The whole body, counting bytes while reading and giving up after `time_limit` s."""
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(time_limit):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise Rejected(
                        respond.error(400, "the client went away", code="client_disconnected")
                    )
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    raise Rejected(_too_large(max_bytes))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError as exc:
        raise Rejected(
            respond.error(
                408,
                f"the request body did not arrive within {time_limit:g} s",
                code="request_timeout",
            )
        ) from exc


def _too_large(max_bytes: int) -> Answer:
    return respond.error(
        413, f"the request body is larger than {max_bytes} bytes", code="request_too_large"
    )
