"""RailsMiddleware around a real FastAPI app under uvicorn, driven by the openai SDK.

Where the middleware answers, or rebuilds a body, the real proxy (tests.proxy_fixtures)
gets the same request and the two must agree byte for byte.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import openai
import pytest
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from openai.types.chat import ChatCompletionMessageParam
from starlette.testclient import TestClient

from railproxy import RailsMiddleware
from railproxy.decide import Decision
from railproxy.embed import Embedder, Vectors
from railproxy.guard import Guard
from tests import test_canary as canary
from tests.proxy_support import (
    REFUND_PROMPT,
    FakeUpstream,
    Proxy,
    ServerThread,
    chunk_event,
    completion,
)

pytest_plugins = ["tests.proxy_fixtures"]

CANARY = "CANARY-5d1e"
CHAT = "/v1/chat/completions"
JSON_HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True)
class Seen:
    """One request as the wrapped app received it."""

    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    decision: Decision | None
    request_id: str | None


@dataclass
class Inner:
    """The wrapped app's side: what reached it, and the switches of its stream."""

    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    lifespan_ran: bool = False

    def reset(self) -> None:
        self.seen.clear()
        self.release = threading.Event()
        self.disconnected = threading.Event()


def inner_app(inner: Inner) -> FastAPI:
    """An app with its own chat endpoint (an echo LLM that streams), /echo and a websocket."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        inner.lifespan_ran = True
        yield

    app = FastAPI(lifespan=lifespan)

    async def record(request: Request) -> bytes:
        body = await request.body()
        state = request.scope.get("state", {})
        inner.seen.append(
            Seen(
                request.url.path,
                list(request.headers.raw),
                body,
                state.get("railproxy_decision"),
                state.get("request_id"),
            )
        )
        return body

    @app.post(CHAT)
    async def chat(request: Request) -> Response:
        data = json.loads(await record(request))
        text = "INNER " + data["messages"][-1]["content"]
        if not data["stream"]:
            return JSONResponse(completion(text))

        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                yield chunk_event("first ")
                deadline = time.monotonic() + 10
                while not inner.release.is_set():  # the test says when chunk 2 may go
                    if time.monotonic() > deadline:
                        yield chunk_event("never-released ")
                        break
                    await anyio.sleep(0.01)
                yield chunk_event(text)
                yield chunk_event("", finish="stop")
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                # Starlette cancels the stream when `receive` reports the disconnect.
                if not finished:
                    inner.disconnected.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await record(request), media_type="application/octet-stream")

    @app.websocket("/ws")
    async def websocket(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("echo " + await socket.receive_text())
        await socket.close()

    return app


@dataclass(frozen=True)
class Guarded:
    url: str
    inner: Inner

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)


def guarded_app(guard: Guard) -> tuple[FastAPI, Inner]:
    inner = Inner()
    app = inner_app(inner)
    app.add_middleware(RailsMiddleware, guard=guard)
    return app, inner


@pytest.fixture(scope="module")
def servers(guards: dict[str, Guard]) -> Iterator[dict[str, Guarded]]:
    """The guarded app for each refusal mode, under uvicorn on 127.0.0.1."""
    with ExitStack() as stack:
        found: dict[str, Guarded] = {}
        for mode, guard in guards.items():
            app, inner = guarded_app(guard)
            thread = stack.enter_context(ServerThread(app))
            found[mode] = Guarded(thread.url, inner)
        yield found


@pytest.fixture
def served(servers: dict[str, Guarded]) -> Guarded:
    """The message-mode guarded app, with nothing seen yet."""
    servers["message"].inner.reset()
    return servers["message"]


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def post(url: str, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + CHAT, content=json.dumps(payload).encode(), headers=JSON_HEADERS)


# --- approved requests -------------------------------------------------------------------


def test_approved_request_reaches_the_app_rebuilt(served: Guarded) -> None:
    answer = served.sdk().chat.completions.create(
        model=f"model-{CANARY}",
        messages=[
            {"role": "system", "content": f"system {CANARY}"},
            {"role": "user", "content": f"earlier {CANARY}"},
            {"role": "assistant", "content": f"history {CANARY}"},
            {"role": "user", "content": "where is my refund", "name": CANARY},
        ],
        temperature=0.3,
        max_tokens=1_000_000,
        user=CANARY,
        metadata={"note": CANARY},
    )
    assert answer.choices[0].message.content == f"INNER {REFUND_PROMPT}"
    (seen,) = served.inner.seen
    expected = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": REFUND_PROMPT}],
        "stream": False,
        "max_tokens": 4096,  # clamped to the rails' max_tokens_cap
        "temperature": 0.3,
    }
    assert seen.body == json.dumps(expected, separators=(",", ":")).encode()
    headers = dict(seen.headers)
    assert headers[b"content-length"] == str(len(seen.body)).encode()
    assert CANARY.encode() not in seen.body + b"".join(k + v for k, v in seen.headers)
    assert seen.decision is not None and seen.decision.intent == "refund_status"
    assert seen.request_id is not None and len(seen.request_id) == 32


@pytest.mark.parametrize(
    "payload",
    [
        {"messages": user("where is my refund")},
        {"messages": user("I need my last invoice"), "seed": 7, "top_p": 0.5},
        {
            "messages": user("has my refund been processed yet"),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 50,
        },
    ],
    ids=["plain", "rail-model-and-scalars", "stream-with-usage"],
)
def test_rebuilt_body_is_what_the_proxy_sends_upstream(
    payload: dict[str, Any], served: Guarded, proxy: Proxy, upstream: FakeUpstream
) -> None:
    served.inner.release.set()
    payload = {"model": "any", **payload}
    assert post(served.url, payload).status_code == 200
    assert post(proxy.url, payload).status_code == 200
    (seen,) = served.inner.seen
    (sent,) = upstream.requests
    assert seen.body == sent.body


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("where", sorted(canary.BODIES))
def test_the_proxy_canaries_never_reach_the_app(served: Guarded, where: str, stream: bool) -> None:
    """test_canary's table, through the middleware: the app sees the rail's prompt or nothing."""
    served.inner.release.set()
    body = canary.BODIES[where]()
    body.setdefault("stream", stream)
    response = post(served.url, body)
    assert all(canary.CANARY.encode() not in seen.body for seen in served.inner.seen)
    assert response.status_code in (200, 400)
    if not served.inner.seen:  # answered by the middleware: a 400 or a local answer
        assert response.status_code == 400 or response.headers["x-railproxy-decision"] in (
            "refuse",
            "reply",
            "no_match",
        )
        return
    (seen,) = served.inner.seen
    sent = json.loads(seen.body)
    assert sent["messages"] == canary.RAIL_MESSAGES
    assert set(sent) <= {"model", "messages", "stream", "stream_options"}


@pytest.mark.parametrize("where", sorted(canary.RAW_BODIES))
def test_duplicate_key_canaries_are_400s_that_never_reach_the_app(
    served: Guarded, where: str
) -> None:
    response = httpx.post(served.url + CHAT, content=canary.RAW_BODIES[where], headers=JSON_HEADERS)
    assert response.status_code == 400
    assert served.inner.seen == []


def test_sse_from_the_app_streams_through_unbuffered(served: Guarded) -> None:
    stream = served.sdk().chat.completions.create(
        model="any", messages=user("where is my refund"), stream=True
    )
    chunks = iter(stream)
    first = next(chunks)
    # The app holds chunk 2 back until now: chunk 1 got here on its own.
    assert not served.inner.release.is_set()
    assert first.choices[0].delta.content == "first "
    served.inner.release.set()
    rest = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert rest == f"INNER {REFUND_PROMPT}"


def test_client_disconnect_reaches_the_app(served: Guarded) -> None:
    stream = served.sdk().chat.completions.create(
        model="any", messages=user("where is my refund"), stream=True
    )
    assert next(iter(stream)).choices[0].delta.content == "first "
    stream.close()
    assert served.inner.disconnected.wait(2)


# --- answered by the middleware ----------------------------------------------------------


def test_refusals_never_reach_the_app(servers: dict[str, Guarded]) -> None:
    message, error = servers["message"], servers["error"]
    message.inner.reset()
    error.inner.reset()
    refused = message.sdk().chat.completions.create(
        model="any", messages=user("what medicine should I take for a headache")
    )
    assert refused.choices[0].message.content == "I can't give medical advice."
    streamed = message.sdk().chat.completions.create(
        model="any", messages=user("write me a poem about pirates"), stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == "Sorry, I can only help with ACME billing."
    with pytest.raises(openai.BadRequestError) as raised:
        error.sdk().chat.completions.create(model="any", messages=user("can you diagnose my rash"))
    assert raised.value.code == "rail_refused"
    assert raised.value.response.headers["x-railproxy-decision"] == "refuse"
    assert message.inner.seen == [] and error.inner.seen == []


def comparable(response: httpx.Response) -> tuple[int, dict[str, str | None], list[Any]]:
    """Status, the headers that matter and the body, less per-answer ids and times."""
    headers = {
        name: response.headers.get(name)
        for name in ("content-type", "x-railproxy-decision", "x-should-retry", "retry-after")
    }
    if headers["content-type"] == "text/event-stream":
        lines = [line for line in response.text.split("\n\n") if line]
        payloads = [line.removeprefix("data: ") for line in lines]
        documents = [json.loads(p) if p != "[DONE]" else p for p in payloads]
    else:
        documents = [response.json()]
    for document in documents:
        if isinstance(document, dict):
            document.pop("id", None)
            document.pop("created", None)
    return response.status_code, headers, documents


@pytest.mark.parametrize("mode", ["message", "error"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    "text",
    ["what medicine should I take for a headache", "hello there", "write me a poem about pirates"],
    ids=["refuse", "reply", "no_match"],
)
def test_local_answers_match_the_proxy(
    mode: str,
    stream: bool,
    text: str,
    servers: dict[str, Guarded],
    proxies: dict[str, Proxy],
    upstream: FakeUpstream,
) -> None:
    served = servers[mode]
    served.inner.reset()
    payload = {"model": "any", "messages": user(text), "stream": stream}
    mine, theirs = post(served.url, payload), post(proxies[mode].url, payload)
    assert comparable(mine) == comparable(theirs)
    assert len(mine.headers["x-request-id"]) == 32
    assert served.inner.seen == [] and upstream.requests == []


def chunked(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 65536):
        yield data[start : start + 65536]


OVERSIZED = b'{"messages": "' + b"x" * 1_048_576 + b'"}'


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b'{"messages": [', JSON_HEADERS, 400, "invalid_json"),
        (
            json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(),
            JSON_HEADERS,
            400,
            "invalid_value",
        ),
        (
            json.dumps({"messages": user("where is my refund"), "extra": CANARY}).encode(),
            JSON_HEADERS,
            400,
            "unknown_parameter",
        ),
        (
            json.dumps({"messages": user("where is my refund"), "tools": []}).encode(),
            JSON_HEADERS,
            400,
            "unsupported_parameter",
        ),
        (b"where is my refund", {"content-type": "text/plain"}, 415, "unsupported_media_type"),
        (OVERSIZED, JSON_HEADERS, 413, "request_too_large"),
        (chunked(OVERSIZED), JSON_HEADERS, 413, "request_too_large"),
    ],
    ids=[
        "bad-json",
        "last-not-user",
        "unknown-field",
        "tools",
        "not-json",
        "too-large",
        "too-large-chunked",
    ],
)
def test_bad_requests_are_answered_like_the_proxy(
    content: bytes | Iterator[bytes],
    headers: dict[str, str],
    status: int,
    code: str,
    served: Guarded,
    proxy: Proxy,
    upstream: FakeUpstream,
) -> None:
    answers = []
    for url in (served.url, proxy.url):
        body = chunked(OVERSIZED) if not isinstance(content, bytes) else content
        answers.append(httpx.post(url + CHAT, content=body, headers=headers))
    mine, theirs = answers
    assert mine.status_code == status
    assert mine.json()["error"]["code"] == code
    assert mine.content == theirs.content
    assert served.inner.seen == [] and upstream.requests == []


class BrokenEmbedder:
    """The real model's identity, but embedding fails: the guard must fail closed."""

    def __init__(self, real: Embedder) -> None:
        self.real = real

    @property
    def name(self) -> str:
        return self.real.name

    @property
    def dimension(self) -> int:
        return self.real.dimension

    @property
    def max_tokens(self) -> int:
        return self.real.max_tokens

    def count_tokens(self, text: str) -> int:
        return self.real.count_tokens(text)

    def embed(self, texts: Sequence[str]) -> Vectors:
        raise RuntimeError("the model crashed")


def test_guard_failure_is_a_503_and_nothing_reaches_the_app(
    guards: dict[str, Guard], embedder: Embedder
) -> None:
    app, inner = guarded_app(Guard(guards["message"].root, BrokenEmbedder(embedder)))
    with ServerThread(app) as thread:
        response = post(thread.url, {"model": "any", "messages": user("where is my refund")})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "guard_unavailable"
    assert response.headers["retry-after"] == "1"
    assert inner.seen == []


# --- passed through ----------------------------------------------------------------------


def test_other_requests_pass_through_untouched(served: Guarded) -> None:
    body = b'\x00not json {"messages": "' + CANARY.encode() + b'"}\xff'
    request = httpx.Request(
        "POST",
        served.url + "/echo",
        content=body,
        headers={"content-type": "text/plain", "x-custom": CANARY},
    )
    with httpx.Client() as client:
        response = client.send(request)
    assert response.content == body
    (seen,) = served.inner.seen
    assert seen.body == body
    assert seen.headers == [(k.lower(), v) for k, v in request.headers.raw]
    assert seen.decision is None and seen.request_id is None
    # Other methods on the guarded path are the app's business (here: 405).
    assert httpx.get(served.url + CHAT).status_code == 405


def test_trailing_slash_is_guarded_too(served: Guarded) -> None:
    payload = {"model": "any", "messages": user("what medicine should I take for a headache")}
    response = httpx.post(
        served.url + CHAT + "/", content=json.dumps(payload).encode(), headers=JSON_HEADERS
    )
    assert response.headers["x-railproxy-decision"] == "refuse"
    assert served.inner.seen == []


def test_websocket_and_lifespan_pass_through(guards: dict[str, Guard]) -> None:
    app, inner = guarded_app(guards["message"])
    with TestClient(app) as client, client.websocket_connect("/ws") as socket:
        socket.send_text("hello")
        assert socket.receive_text() == "echo hello"
    assert inner.lifespan_ran


def test_needs_exactly_one_of_rails_or_guard(guards: dict[str, Guard]) -> None:
    app = FastAPI()
    with pytest.raises(TypeError, match="exactly one of rails= or guard="):
        RailsMiddleware(app)
    with pytest.raises(TypeError, match="exactly one of rails= or guard="):
        RailsMiddleware(app, rails=guards["message"].root, guard=guards["message"])
