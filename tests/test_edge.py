"""`Edge` around an app that fails: the client still gets an OpenAI-shaped 500 with its
request id, the request is logged and audited once, and nothing of the exception leaks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from railproxy.asgi import Receive, Scope, Send
from railproxy.edge import Edge
from railproxy.metrics import Metrics
from railproxy.proxy_settings import ClientKeys
from tests.proxy_support import ServerThread

SECRET = "SECRET-IN-AN-EXCEPTION"


async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/late":  # fails after the response has started
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
    raise RuntimeError(SECRET)


@pytest.fixture(scope="module")
def edge() -> Iterator[tuple[str, list[tuple[dict[str, Any], int]], Metrics]]:
    audited: list[tuple[dict[str, Any], int]] = []
    metrics = Metrics()
    app = Edge(
        failing_app,
        keys=ClientKeys(()),
        max_in_flight=4,
        metrics=metrics,
        audit=lambda state, status: audited.append((dict(state), status)),
    )
    with ServerThread(app, lifespan="off") as server:
        yield server.url, audited, metrics


def test_an_app_exception_is_a_500_with_the_request_id(
    edge: tuple[str, list[tuple[dict[str, Any], int]], Metrics], caplog: pytest.LogCaptureFixture
) -> None:
    url, audited, metrics = edge
    audited.clear()
    response = httpx.post(url + "/v1/chat/completions", json={"messages": []})
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "internal error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert len(response.headers["x-request-id"]) == 32
    deadline = time.monotonic() + 5  # audited once the answer is on its way
    while not audited and time.monotonic() < deadline:
        time.sleep(0.01)
    ((state, status),) = audited
    assert status == 500 and state["decision"] == "error"
    assert state["request_id"] == response.headers["x-request-id"]
    assert SECRET not in response.text and SECRET not in caplog.text
    assert "RuntimeError" in caplog.text
    assert b"railproxy_in_flight 0.0" in metrics.render()


def test_an_exception_after_the_response_started_drops_the_connection(
    edge: tuple[str, list[tuple[dict[str, Any], int]], Metrics],
) -> None:
    url, _, _ = edge
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url + "/late")
