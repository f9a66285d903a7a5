"""Decisions and errors -> OpenAI-shaped bytes: completions, SSE chunks, error bodies.

Framework-free. An `Answer` says what to send (status, headers, body); each door
writes it with its own machinery. Every error body has the OpenAI shape
`{"error": {"message", "type", "param", "code"}}`.

Local answers (refuse, reply, no_match) are normal `chat.completion` objects, or
`chat.completion.chunk` events ending in `data: [DONE]` when the client streams.
In `error` refusal mode, refuse and no_match become 400 errors (`rail_refused`,
`rail_no_match`) with `x-should-retry: false`, so SDKs do not retry them; a
reply is always a 200 completion.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from railproxy.decide import Decision

JSON = "application/json"
SSE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
LOCAL_MODEL = "railproxy"  # the `model` of answers railproxy writes itself
DECISION_HEADER = "x-railproxy-decision"
NO_RETRY = {"x-should-retry": "false"}

RefusalMode = Literal["message", "error"]

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
}


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete response: status, body and the headers specific to it."""

    status: int
    body: bytes
    media_type: str = JSON
    headers: Mapping[str, str] = field(default_factory=dict)


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> bytes:
    error = {"message": message, "type": type, "param": param, "code": code}
    # ASCII escapes: messages and params may quote client text, lone surrogates included.
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def error(
    status: int,
    message: str,
    *,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    body = error_body(message, type=error_type(status), param=param, code=code)
    return Answer(status, body, JSON, dict(headers or {}))


def sse_error(message: str, *, code: str, type: str = "server_error") -> bytes:
    """The event that ends a failed stream. No `[DONE]` may follow it."""
    return b"data: " + error_body(message, type=type, code=code) + b"\n\n"


def completion(text: str, *, id: str, created: int, model: str = LOCAL_MODEL) -> bytes:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    return dumps(
        {
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _usage(),
        }
    )


def completion_events(
    text: str, *, id: str, created: int, include_usage: bool = False, model: str = LOCAL_MODEL
) -> bytes:
    """A whole answer as SSE `chat.completion.chunk` events, ending in `[DONE]`."""
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": text}, None),
        ({}, "stop"),
    ]
    events = []
    for delta, finish in deltas:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        events.append(_chunk(id, created, model, [choice], include_usage, None))
    if include_usage:
        events.append(_chunk(id, created, model, [], include_usage, _usage()))
    return b"".join(b"data: " + event + b"\n\n" for event in events) + DONE


def decision_answer(
    decision: Decision,
    *,
    mode: RefusalMode,
    stream: bool,
    include_usage: bool = False,
    request_id: str,
    created: int | None = None,
) -> Answer:
    """The local answer for a refuse, reply or no_match decision."""
    if decision.approved:
        raise ValueError("an approved decision is answered by the upstream")
    headers = {DECISION_HEADER: decision.action}
    text = decision.message or ""
    if mode == "error" and decision.action != "reply":
        code = "rail_refused" if decision.action == "refuse" else "rail_no_match"
        return error(400, text, code=code, headers={**headers, **NO_RETRY})
    id = f"chatcmpl-rp{request_id}"
    stamp = int(time.time()) if created is None else created
    if stream:
        body = completion_events(text, id=id, created=stamp, include_usage=include_usage)
        return Answer(200, body, SSE, headers)
    return Answer(200, completion(text, id=id, created=stamp), JSON, headers)


def _chunk(
    id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage: dict[str, int] | None,
) -> bytes:
    chunk: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage
    return dumps(chunk)


def _usage() -> dict[str, int]:
    # A local answer uses no model tokens.
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
