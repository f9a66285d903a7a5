"""The invariant: a canary placed anywhere in a chat request never reaches the upstream.

Each case hides the canary in one place where text can hide, next to an
approved request. Whatever railproxy answers (the rail's own prompt upstream,
a refusal, or a 400), every byte the real upstream server recorded is checked,
and whatever did go upstream is exactly the rail's prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.proxy_support import REFUND_PROMPT, FakeUpstream, Proxy

pytest_plugins = ["tests.proxy_fixtures"]

CANARY = "CANARY-7f3a9c"
APPROVED = {"role": "user", "content": "where is my refund"}
RAIL_MESSAGES = [{"role": "user", "content": REFUND_PROMPT}]

Body = dict[str, Any]


def base() -> Body:
    return {"model": "gpt-4o-mini", "messages": [APPROVED]}


def with_history(*earlier: dict[str, Any]) -> Body:
    return {**base(), "messages": [*earlier, APPROVED]}


def with_last(message: dict[str, Any]) -> Body:
    return {**base(), "messages": [message]}


def with_field(name: str, value: Any) -> Body:
    return {**base(), name: value}


TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": CANARY,
        "parameters": {"type": "object", "properties": {"q": {"description": CANARY}}},
    },
}
TOOL_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": CANARY}}

BODIES: dict[str, Callable[[], Body]] = {
    "earlier-user-turn": lambda: with_history({"role": "user", "content": CANARY}),
    "consecutive-user-turns": lambda: with_history(
        {"role": "user", "content": f"where is my refund {CANARY}"}
    ),
    "assistant-turn": lambda: with_history({"role": "assistant", "content": CANARY}),
    "assistant-refusal-field": lambda: with_history(
        {"role": "assistant", "content": "ok", "refusal": CANARY}
    ),
    "system-message": lambda: with_history({"role": "system", "content": CANARY}),
    "developer-message": lambda: with_history({"role": "developer", "content": CANARY}),
    "earlier-name": lambda: with_history({"role": "user", "content": "hi", "name": CANARY}),
    "last-name": lambda: with_last({**APPROVED, "name": CANARY}),
    "earlier-text-parts": lambda: with_history(
        {"role": "user", "content": [{"type": "text", "text": CANARY}]}
    ),
    "extra-text-part": lambda: with_last(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "where is my refund"},
                {"type": "text", "text": CANARY},
            ],
        }
    ),
    "same-text-as-approved": lambda: with_last(
        {"role": "user", "content": f"where is my refund {CANARY}"}
    ),
    "image-part": lambda: with_last(
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "where is my refund"},
                {"type": "image_url", "image_url": {"url": f"http://x/{CANARY}.png"}},
            ],
        }
    ),
    "file-part": lambda: with_last(
        {"role": "user", "content": [{"type": "file", "file": {"file_data": CANARY}}]}
    ),
    "part-extra-key": lambda: with_last(
        {"role": "user", "content": [{"type": "text", "text": "where is my refund", "x": CANARY}]}
    ),
    "tool-calls": lambda: with_history(
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}
    ),
    "tool-message": lambda: with_history(
        {"role": "tool", "tool_call_id": CANARY, "content": CANARY}
    ),
    "tool-message-last": lambda: with_last(
        {"role": "tool", "tool_call_id": "c1", "content": CANARY}
    ),
    "function-message": lambda: with_history({"role": "function", "name": "f", "content": CANARY}),
    "tools": lambda: with_field("tools", [TOOL]),
    "tool-choice": lambda: with_field(
        "tool_choice", {"type": "function", "function": {"name": CANARY}}
    ),
    "functions": lambda: with_field("functions", [TOOL["function"]]),
    "function-call": lambda: with_field("function_call", {"name": CANARY}),
    "response-format": lambda: with_field(
        "response_format",
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"description": CANARY}}},
    ),
    "prediction": lambda: with_field("prediction", {"type": "content", "content": CANARY}),
    "logit-bias": lambda: with_field("logit_bias", {CANARY: 100}),
    "stop": lambda: with_field("stop", [CANARY]),
    "metadata": lambda: with_field("metadata", {"note": CANARY}),
    "user": lambda: with_field("user", CANARY),
    "safety-identifier": lambda: with_field("safety_identifier", CANARY),
    "prompt-cache-key": lambda: with_field("prompt_cache_key", CANARY),
    "model": lambda: with_field("model", CANARY),
    "audio": lambda: with_field("audio", {"voice": CANARY, "format": "wav"}),
    "web-search-options": lambda: with_field(
        "web_search_options", {"user_location": {"approximate": {"city": CANARY}}}
    ),
    "vendor-chat-template": lambda: with_field("chat_template", CANARY),
    "vendor-guided-json": lambda: with_field("guided_json", {"description": CANARY}),
    "vendor-extra-body": lambda: with_field("extra_body", {"messages": [CANARY]}),
    "vendor-api-base": lambda: with_field("api_base", f"http://{CANARY}.invalid"),
    "stream-options-extra": lambda: {
        **base(),
        "stream": True,
        "stream_options": {"include_usage": True, CANARY: True},
    },
    "temperature-as-text": lambda: with_field("temperature", CANARY),
}

RAW_BODIES: dict[str, bytes] = {
    # A parser that keeps the first duplicate would see the canary.
    "duplicate-messages-key": (
        b'{"model": "m", "messages": [{"role": "user", "content": "'
        + CANARY.encode()
        + b'"}], "messages": [{"role": "user", "content": "where is my refund"}]}'
    ),
    "duplicate-content-key": (
        b'{"messages": [{"role": "user", "content": "'
        + CANARY.encode()
        + b'", "content": "where is my refund"}]}'
    ),
}

HEADERS: dict[str, dict[str, str]] = {
    "authorization": {"authorization": f"Bearer {CANARY}"},
    "openai-organization": {"openai-organization": CANARY, "openai-project": CANARY},
    "cookie": {"cookie": f"session={CANARY}"},
    "user-agent": {"user-agent": CANARY},
    "forwarded": {"x-forwarded-for": CANARY, "forwarded": f"for={CANARY}", "x-real-ip": CANARY},
    "custom": {"x-canary": CANARY, "x-request-id": CANARY, "idempotency-key": CANARY},
    "api-keys": {"api-key": CANARY, "x-api-key": CANARY},
    "upstream-override": {"x-upstream-url": f"http://{CANARY}", "host": f"{CANARY}.invalid"},
}


def check(proxy: Proxy, upstream: FakeUpstream, response: httpx.Response) -> None:
    """The canary never arrived, and the answer is a refusal, a 400 or the rail's prompt."""
    assert CANARY.encode() not in upstream.everything()
    if response.status_code == 400:
        assert upstream.requests == []
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        return
    assert response.status_code == 200
    decision = response.headers["x-railproxy-decision"]
    assert decision in ("prompt", "refuse", "reply", "no_match")
    if decision != "prompt":
        assert upstream.requests == []
        return
    assert len(upstream.requests) == 1
    sent = upstream.requests[0].json()
    assert sent["messages"] == RAIL_MESSAGES
    assert sent["model"] == "gpt-4o-mini"
    assert set(sent) <= {"model", "messages", "stream", "stream_options"}


def post(proxy: Proxy, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        proxy.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **(headers or {})},
        timeout=10,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("where", sorted(BODIES))
def test_canary_in_the_body_never_reaches_upstream(
    proxy: Proxy, upstream: FakeUpstream, where: str, stream: bool
) -> None:
    body = BODIES[where]()
    body.setdefault("stream", stream)
    check(proxy, upstream, post(proxy, json.dumps(body).encode()))


@pytest.mark.parametrize("where", sorted(RAW_BODIES))
def test_canary_behind_a_duplicate_key_never_reaches_upstream(
    proxy: Proxy, upstream: FakeUpstream, where: str
) -> None:
    response = post(proxy, RAW_BODIES[where])
    assert response.status_code == 400
    check(proxy, upstream, response)


@pytest.mark.parametrize("where", sorted(HEADERS))
def test_canary_in_headers_never_reaches_upstream(
    proxy: Proxy, upstream: FakeUpstream, where: str
) -> None:
    response = post(proxy, json.dumps(base()).encode(), HEADERS[where])
    assert response.headers["x-railproxy-decision"] == "prompt"
    check(proxy, upstream, response)


def test_canary_in_the_query_string_never_reaches_upstream(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    response = httpx.post(
        proxy.url + f"/v1/chat/completions?q={CANARY}&api-version={CANARY}",
        content=json.dumps(base()).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.headers["x-railproxy-decision"] == "prompt"
    check(proxy, upstream, response)


def test_canary_in_the_path_is_a_404(proxy: Proxy, upstream: FakeUpstream) -> None:
    response = httpx.post(
        proxy.url + f"/v1/chat/completions/{CANARY}",
        content=json.dumps(base()).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 404
    assert upstream.requests == []
