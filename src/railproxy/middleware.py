"""`RailsMiddleware`: railproxy's guard in front of an existing ASGI app.

    app.add_middleware(RailsMiddleware, rails="rails/")

Pure ASGI (not `BaseHTTPMiddleware`), so bodies and streams are never buffered
by Starlette. For `POST .../chat/completions` it runs the proxy's own steps
(`intake`, then `gate`): refusals, replies, bad input (4xx), oversized bodies
(413) and guard failures (503) are answered here, byte for byte as the proxy
answers them; an approved request reaches the app with its body replaced by
the upstream body the proxy would send, so the app sees only the rail's
prompt. Every other request, and websocket and lifespan scopes, pass through
untouched. `send` is never wrapped, so the app's SSE streams out unbuffered;
after the rebuilt body, `receive` is the server's own, so the app still hears
`http.disconnect`.

Put it outermost of any middleware that reads request bodies. Guarded requests
get `request.state.railproxy_decision` (the `Decision`) and
`request.state.request_id` (also the `x-request-id` of local answers).

With `rails=`, the model and index load when Starlette builds its middleware
stack (at startup); pass `guard=Guard("rails/")` instead to load them, and fail
on a stale index, at import, or to share one guard between apps.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from railproxy.asgi import ASGIApp, Message, Receive, Scope, Send, send_answer
from railproxy.gate import Local, handle
from railproxy.guard import Guard
from railproxy.intake import Rejected, check_headers, read_body

PATH_SUFFIX = "/chat/completions"
_REPLACED = frozenset({b"content-length", b"transfer-encoding"})


class RailsMiddleware:
    """Guard the chat-completions routes of `app` with the rails in `rails` (or `guard`)."""

    def __init__(
        self, app: ASGIApp, *, rails: Path | str | None = None, guard: Guard | None = None
    ) -> None:
        if guard is None and rails is not None:
            guard = Guard(rails)
            guard.warm_up()
        elif guard is None or rails is not None:
            raise TypeError("RailsMiddleware needs exactly one of rails= or guard=")
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not guarded(scope):
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        ids = {"x-request-id": request_id}
        limits = self.guard.rails.config.server  # per request: a reload may change them
        try:
            check_headers(scope["headers"], max_bytes=limits.max_body_bytes)
            body = await read_body(
                receive, max_bytes=limits.max_body_bytes, time_limit=limits.timeouts.client_body
            )
        except Rejected as exc:
            await send_answer(send, exc.answer, ids)
            return
        outcome = await handle(self.guard, body, limits=limits, request_id=request_id)
        if isinstance(outcome, Local):
            await send_answer(send, outcome.answer, ids)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _REPLACED]
        headers.append((b"content-length", str(len(outcome.body)).encode()))
        state = {
            **scope.get("state", {}),
            "request_id": request_id,
            "railproxy_decision": outcome.decision,
        }
        inner = {**scope, "headers": headers, "state": state}
        await self.app(inner, replay(outcome.body, receive), send)


def guarded(scope: Scope) -> bool:
    """POST to a path ending in /chat/completions (a trailing slash included)."""
    return (
        scope["type"] == "http"
        and scope["method"] == "POST"
        and str(scope["path"]).rstrip("/").endswith(PATH_SUFFIX)
    )


def replay(body: bytes, receive: Receive) -> Receive:
    """`body` as one message, then the server's own `receive` (disconnects included)."""
    pending = True

    async def wrapped() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped
