"""The proxy's outer layer (pure ASGI): one request id, strict paths, client keys, load shedding.

In order, for every HTTP request:

1. a fresh `x-request-id` (never the client's) goes on every response, errors included
   (an exception from the app is answered here, as a 500 with the id);
2. a percent-encoded path is a 404: `/v1/chat%2Fcompletions` must not reach a route;
3. when client keys are configured, everything but /healthz and /readyz needs
   `Authorization: Bearer <key>` (401 otherwise);
4. beyond `max_in_flight` chat requests, a 503 with Retry-After, at once;
5. one access-log line: method, path (never the query string), status, time,
   decision and intent. Keys and prompts are never logged;
6. an audit record (through `audit`) for every chat request, and every 401, that
   the app did not record itself: those answered here or before a decision.

WebSocket connections are refused.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from railproxy import respond
from railproxy.asgi import CLIENT_CLOSED, ASGIApp, Message, Receive, Scope, Send, send_answer
from railproxy.audit import key_id
from railproxy.metrics import Metrics
from railproxy.proxy_settings import ClientKeys
from railproxy.respond import Answer

access_log = logging.getLogger("railproxy.access")
logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
CHAT_PATH = "/v1/chat/completions"
LIMITED_PATHS = frozenset({CHAT_PATH})
# The decision label of a request answered before the guard decided, by status.
EDGE_DECISIONS = {401: "unauthorized", 404: "not_found", 503: "overloaded", 500: "error"}
NOT_FOUND = (
    "no such endpoint: railproxy serves POST /v1/chat/completions, GET /v1/models, "
    "/healthz, /readyz and /metrics"
)


class Edge:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: ClientKeys,
        max_in_flight: int,
        metrics: Metrics,
        audit: Callable[[dict[str, Any], int], None] | None = None,
        chat: ASGIApp | None = None,
    ) -> None:
        self.app = app
        # POST /v1/chat/completions goes straight to `chat` when given: every guarded
        # request then skips the framework's exception middleware and router.
        self.chat = chat
        self.keys = keys
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.audit = audit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = state["started"] = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            refusal = self._refusal(scope, state)
            if refusal is not None:
                await send_answer(send_with_id, refusal)
            elif scope["path"] in LIMITED_PATHS:
                await self._limited(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if status:  # the response has started: all that is left is to drop the connection
                raise
            # Answered here, not by Starlette's outer error handler, so it carries the id.
            # The type only: an exception's message may quote the request.
            logger.error("request %s failed: %s", request_id, type(exc).__name__)
            await send_answer(
                send_with_id, respond.error(500, "internal error", code="internal_error")
            )
        finally:
            audited = scope["path"] in LIMITED_PATHS or status == 401
            if self.audit is not None and audited and not state.get("audited"):
                state.setdefault("decision", EDGE_DECISIONS.get(status, "invalid"))
                self.audit(state, status or CLIENT_CLOSED)
            self._log(scope, state, status or CLIENT_CLOSED, time.perf_counter() - started)

    def _refusal(self, scope: Scope, state: dict[str, object]) -> Answer | None:
        raw = scope.get("raw_path")
        if raw is not None and raw != scope["path"].encode("utf-8"):
            return respond.error(404, NOT_FOUND, code="not_found")
        if not self.keys or scope["path"] in OPEN_PATHS:
            return None
        presented = _bearer(scope)
        if presented is None or not self.keys.accepts(presented):
            return respond.error(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )
        state["key_id"] = key_id(presented)
        return None

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.in_flight >= self.max_in_flight:
            answer = respond.error(
                503,
                f"railproxy is handling its limit of {self.max_in_flight} requests; retry shortly",
                code="overloaded",
                headers={"retry-after": "1"},
            )
            await send_answer(send, answer)
            return
        self.in_flight += 1
        self.metrics.in_flight.inc()
        app = self.app
        if self.chat is not None and scope["method"] == "POST" and scope["path"] == CHAT_PATH:
            app = self.chat
        try:
            await app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def _log(self, scope: Scope, state: dict[str, object], status: int, seconds: float) -> None:
        path = str(scope["path"])[:200].encode("unicode_escape").decode("ascii")
        method = str(scope.get("method", ""))[:16].encode("unicode_escape").decode("ascii")
        access_log.info(
            '"%s %s" %d %.1fms id=%s decision=%s intent=%s',
            method,
            path,
            status,
            seconds * 1000,
            state["request_id"],
            state.get("decision", "-"),
            state.get("intent", "-"),
        )


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None
