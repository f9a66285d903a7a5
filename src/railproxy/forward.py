"""Forwarding an approved request and relaying the answer (the proxy's Starlette side).

Non-streaming: the upstream's checked JSON, or an OpenAI error mapped by
`upstream`. Streaming: nothing is sent to the client until the upstream's first
event has arrived, so an early failure is still a real status code; after that,
events are relayed as they arrive and a failure ends the stream with an error
event and no `[DONE]`. If the client disconnects at any point, the upstream
request is cancelled at once. Nothing is ever retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, MutableMapping
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from railproxy.asgi import (
    CLIENT_CLOSED,
    Receive,
    Scope,
    Send,
    encode_headers,
    race_disconnect,
    send_answer,
    send_relay,
)
from railproxy.gate import Forward
from railproxy.respond import DECISION_HEADER, JSON, SSE, Answer
from railproxy.sse import Relay
from railproxy.upstream import UpstreamFailure

if TYPE_CHECKING:
    from railproxy.proxy import ProxyState


class AnswerResponse(Response):
    """An `Answer` as a Starlette response; `done` runs once it has been sent.

    Bookkeeping (metrics, the audit record) goes in `done`, so the client does not
    wait for it.
    """

    def __init__(
        self,
        answer: Answer,
        extra: Mapping[str, str] | None = None,
        *,
        done: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(answer.body, answer.status)
        self.answer = answer
        self.extra = dict(extra or {})
        self.done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send_answer(send, self.answer, self.extra)
        finally:
            if self.done is not None:
                self.done()


class RelayResponse(Response):
    """An upstream event stream as a Starlette response; `done` runs when it ends."""

    def __init__(
        self, relay: Relay, headers: Mapping[str, str], done: Callable[[str], None]
    ) -> None:
        super().__init__(status_code=200)
        self.relay = relay
        self.extra = headers
        self.done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send_relay(self.relay, receive, send, encode_headers(SSE, self.extra))
        finally:
            self.done(self.relay.outcome)


async def forward(
    proxy: ProxyState, receive: Receive, state: MutableMapping[str, Any], outcome: Forward
) -> Response:
    headers = {DECISION_HEADER: "prompt"}
    decision = outcome.decision
    stream = outcome.request.stream
    started = time.perf_counter()

    def record(**fields: Any) -> None:
        fields.setdefault("upstream_ms", round((time.perf_counter() - started) * 1000, 3))
        proxy.record(state, score=decision.score, stream=stream, **fields)

    try:
        if stream:
            result: Relay | bytes | None = await race_disconnect(
                receive, partial(proxy.upstream.open_stream, outcome.body)
            )
        else:
            result = await race_disconnect(receive, partial(proxy.upstream.complete, outcome.body))
    except UpstreamFailure as exc:
        proxy.metrics.upstream(exc.status, exc.code)
        record(status=exc.status, outcome=exc.code)
        return AnswerResponse(exc.answer(), headers)
    if result is None:  # the client went away; the upstream request was cancelled
        proxy.metrics.upstream(CLIENT_CLOSED, "client_abort")
        record(status=CLIENT_CLOSED, outcome="client_abort")
        return Response(status_code=CLIENT_CLOSED)
    seconds = time.perf_counter() - started
    proxy.metrics.upstream_seconds.observe(seconds)
    if isinstance(result, Relay):

        def ended(outcome: str) -> None:
            proxy.metrics.upstream(200, outcome)
            record(status=200, outcome=outcome)

        return RelayResponse(result, headers, ended)

    def completed() -> None:
        proxy.metrics.upstream(200, "completed")
        record(status=200, outcome="completed", upstream_ms=round(seconds * 1000, 3))

    return AnswerResponse(Answer(200, result, JSON, headers), done=completed)
