"""One request body -> `Local` (answer it here) or `Forward` (send these bytes upstream).

This is the step every door shares: parse strictly, run the guard, then either
answer locally (400, 503, refusal, reply, no-match) or build the upstream body
from scratch. Framework-free; it fails closed: any failure inside the guard is
a 503 `guard_unavailable` and nothing is forwarded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from railproxy import respond
from railproxy.chat import BadRequest, ChatRequest, parse_chat_request, upstream_body
from railproxy.decide import Decision
from railproxy.errors import GuardUnavailable, InputError
from railproxy.guard import Guard
from railproxy.respond import Answer
from railproxy.settings import ServerConfig

logger = logging.getLogger(__name__)

RETRY_AFTER = {"retry-after": "1"}


@dataclass(frozen=True, slots=True)
class Local:
    """Answered by railproxy itself; nothing goes upstream."""

    answer: Answer
    label: str  # refuse, reply, no_match, invalid or unavailable: for metrics and logs
    request: ChatRequest | None = None
    decision: Decision | None = None
    guard_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Forward:
    """Approved: `body` is exactly what the upstream receives."""

    request: ChatRequest
    decision: Decision
    body: bytes
    guard_seconds: float
    label: str = "prompt"


async def handle(
    guard: Guard, body: bytes, *, limits: ServerConfig, request_id: str
) -> Local | Forward:
    """Decide what happens to one Chat Completions request body."""
    try:
        request = parse_chat_request(body, limits)
    except BadRequest as exc:
        answer = respond.error(400, exc.message, code=exc.code, param=exc.param)
        return Local(answer, "invalid")
    started = time.perf_counter()
    try:
        # The rails' own guard timeout applies, and a tighter server override too.
        decision = await guard.acheck(request.text, within=limits.timeouts.guard)
    except InputError as exc:
        answer = respond.error(400, str(exc), code=exc.code, param="messages")
        return Local(answer, "invalid", request)
    except GuardUnavailable as exc:
        logger.error("request %s: guard unavailable: %s", request_id, exc)
        return Local(_unavailable(), "unavailable", request)
    except Exception:  # fail closed, whatever broke
        logger.exception("request %s: guard failure", request_id)
        return Local(_unavailable(), "unavailable", request)
    seconds = time.perf_counter() - started
    if not decision.approved:
        answer = respond.decision_answer(
            decision,
            mode=decision.refusal_mode,
            stream=request.stream,
            include_usage=request.include_usage,
            request_id=request_id,
        )
        return Local(answer, decision.action, request, decision, seconds)
    rebuilt = upstream_body(request, decision, limits.max_tokens_cap)
    return Forward(request, decision, rebuilt, seconds)


def _unavailable() -> Answer:
    return respond.error(
        503,
        "the guard could not check this request, so nothing was sent upstream; try again",
        code="guard_unavailable",
        headers=RETRY_AFTER,
    )
