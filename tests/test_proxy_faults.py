"""End to end, when things go wrong: upstream faults, disconnects, overload, auth, a broken guard.

Every upstream fault is produced by the real fake upstream server; every check
counts what it received (a sent request is never retried) and makes sure no
upstream body, header or key leaks to the client.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import openai
import pytest

from railproxy.embed import Embedder, Vectors
from railproxy.guard import Guard
from railproxy.sse import MAX_EVENT_BYTES
from tests.proxy_support import (
    UPSTREAM_KEY,
    FakeUpstream,
    Proxy,
    chat_body,
    chunk_event,
    raw_request,
    running_proxy,
)

pytest_plugins = ["tests.proxy_fixtures"]

JSON = {"content-type": "application/json"}
CHAT = "/v1/chat/completions"
TIMEOUTS = {
    "upstream_connect": 1,
    "upstream_first_byte": 1,
    "upstream_stream_idle": 1,
    "upstream_total": 5,
}


@pytest.fixture(scope="module")
def fast(guards: dict[str, Guard], upstream_url: str) -> Iterator[Proxy]:
    with running_proxy(guards["message"], upstream_url, server={"timeouts": TIMEOUTS}) as proxy:
        yield proxy


def post(proxy: Proxy, *, stream: bool = False, **fields: Any) -> httpx.Response:
    return httpx.post(
        proxy.url + CHAT,
        content=chat_body(stream=stream, **fields),
        headers=JSON,
        timeout=10,
    )


def assert_no_leak(response: httpx.Response) -> None:
    for secret in (UPSTREAM_KEY, "internal detail", "org-secret", "upstream-cookie"):
        assert secret not in response.text
        assert all(secret not in value for value in response.headers.values())
    assert "openai-organization" not in response.headers


# ---- upstream failures before the first byte map to real status codes


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("behaviour", "options", "status", "code"),
    [
        ("status", {"status": 429, "headers": {"retry-after": "7"}}, 429, "rate_limit_exceeded"),
        ("status", {"status": 500}, 502, "upstream_error"),
        ("status", {"status": 503, "headers": {"retry-after": "3"}}, 502, "upstream_error"),
        ("status", {"status": 401}, 502, "upstream_auth_failed"),
        ("status", {"status": 403}, 502, "upstream_auth_failed"),
        ("status", {"status": 400}, 502, "upstream_rejected"),
        ("status", {"status": 404}, 502, "upstream_rejected"),
        ("redirect", {}, 502, "upstream_invalid_response"),
        ("garbage", {}, 502, "upstream_invalid_response"),
        ("not_completion", {}, 502, "upstream_invalid_response"),
        ("hang", {}, 504, "upstream_timeout"),
    ],
    ids=[
        "429",
        "500",
        "503",
        "401",
        "403",
        "400",
        "404",
        "redirect",
        "html",
        "json-not-completion",
        "hang",
    ],
)
def test_upstream_faults_are_mapped(
    fast: Proxy,
    upstream: FakeUpstream,
    behaviour: str,
    options: dict[str, Any],
    status: int,
    code: str,
    stream: bool,
) -> None:
    upstream.reset(behaviour, **options)
    response = post(fast, stream=stream)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.headers["x-railproxy-decision"] == "prompt"
    assert response.headers["content-type"] == "application/json"
    if status == 429:
        assert response.headers["retry-after"] == "7"
    else:
        assert "retry-after" not in response.headers
    if code in ("upstream_auth_failed", "upstream_rejected"):
        assert response.headers["x-should-retry"] == "false"
    assert_no_leak(response)
    assert len(upstream.requests) == 1  # never retried


def test_unreachable_upstream_is_502(guards: dict[str, Guard], upstream: FakeUpstream) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        with running_proxy(guards["message"], f"http://127.0.0.1:{port}/v1") as proxy:
            response = post(proxy)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


def test_sdk_sees_upstream_errors_as_api_errors(fast: Proxy, upstream: FakeUpstream) -> None:
    upstream.reset("status", status=429, headers={"retry-after": "0"})
    client = openai.OpenAI(base_url=fast.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "where is my refund"}]
        )


# ---- failures after the first byte end the stream with an error event, no [DONE]


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        ("hang_after_first", "upstream_timeout"),
        ("close_after_first", "upstream_stream_error"),
        ("end_without_done", "upstream_stream_error"),
    ],
)
def test_mid_stream_failures_end_with_an_error_event(
    fast: Proxy, upstream: FakeUpstream, behaviour: str, code: str
) -> None:
    upstream.reset(behaviour)
    response = post(fast, stream=True)
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[0].startswith("data: {") and '"ECHO' in events[0]
    assert events[-1].startswith('data: {"error":')
    assert f'"code":"{code}"' in events[-1]
    assert "data: [DONE]" not in response.text
    assert_no_leak(response)
    assert len(upstream.requests) == 1


def test_a_stream_that_never_ends_is_cut_at_the_total_deadline(
    fast: Proxy, upstream: FakeUpstream
) -> None:
    """Chunks keep coming (so the idle timeout never fires); upstream_total still ends it."""
    upstream.reset("slow_stream", interval=0.2, count=1000)
    started = time.monotonic()
    response = post(fast, stream=True)
    elapsed = time.monotonic() - started
    events = [e for e in response.text.split("\n\n") if e]
    assert response.status_code == 200
    assert sum('"tick ' in e for e in events) > 5  # it was relayed as it came
    assert events[-1].startswith('data: {"error":') and '"code":"upstream_timeout"' in events[-1]
    assert "total deadline" in events[-1]
    assert "data: [DONE]" not in response.text
    assert TIMEOUTS["upstream_total"] <= elapsed < TIMEOUTS["upstream_total"] + 2
    assert upstream.disconnected.wait(3)  # the upstream connection was closed
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("behaviour", "options", "status", "code", "message", "seconds"),
    [
        ("hang_in_body", {}, 504, "upstream_timeout", "reading the answer", (1, 3)),
        # Each byte within the idle deadline, but the whole past the total deadline.
        ("drip_body", {"interval": 0.2}, 504, "upstream_timeout", "reading the answer", (5, 7)),
        ("huge_body", {}, 502, "upstream_invalid_response", "too large", (0, 3)),
    ],
    ids=["stalls", "drips", "too-large"],
)
def test_a_json_answer_that_stalls_drips_or_grows_is_cut_off(
    fast: Proxy,
    upstream: FakeUpstream,
    behaviour: str,
    options: dict[str, Any],
    status: int,
    code: str,
    message: str,
    seconds: tuple[float, float],
) -> None:
    upstream.reset(behaviour, **options)
    started = time.monotonic()
    response = post(fast)
    elapsed = time.monotonic() - started
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert message in response.json()["error"]["message"]
    assert seconds[0] <= elapsed < seconds[1]
    assert upstream.disconnected.wait(3)  # and the upstream connection was dropped


def test_absurdly_nested_upstream_json_is_a_502(fast: Proxy, upstream: FakeUpstream) -> None:
    upstream.reset("raw", body=b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    response = post(fast)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_invalid_response"
    assert len(upstream.requests) == 1


def test_an_oversized_event_arriving_whole_ends_the_stream(
    fast: Proxy, upstream: FakeUpstream
) -> None:
    huge = b"data: " + b"x" * (MAX_EVENT_BYTES + 10) + b"\n\n"
    upstream.reset("raw", body=chunk_event("first ") + huge + b"data: [DONE]\n\n")
    response = post(fast, stream=True)
    events = [e for e in response.text.split("\n\n") if e]
    assert response.status_code == 200
    assert '"first ' in events[0]
    assert events[-1].startswith('data: {"error":') and "too large" in events[-1]
    assert len(response.content) < MAX_EVENT_BYTES  # the big event was never relayed
    assert "data: [DONE]" not in response.text


def test_events_ending_in_any_blank_line_are_relayed(fast: Proxy, upstream: FakeUpstream) -> None:
    """The SSE spec lets a line end in CRLF, LF or CR; a blank line ends an event."""
    first, second = chunk_event("one ")[:-2], chunk_event("two ")[:-2]
    body = first + b"\n\r\n" + second + b"\r\n\n" + b"data: [DONE]\n\r\n"
    upstream.reset("raw", body=body)
    client = openai.OpenAI(base_url=fast.url + "/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "where is my refund"}], stream=True
    )
    assert [chunk.choices[0].delta.content for chunk in stream] == ["one ", "two "]


def test_sdk_stream_raises_on_a_mid_stream_failure(fast: Proxy, upstream: FakeUpstream) -> None:
    upstream.reset("hang_after_first")
    client = openai.OpenAI(base_url=fast.url + "/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "where is my refund"}], stream=True
    )
    with pytest.raises(openai.APIError, match="stalled"):
        for _ in stream:
            pass


# ---- a client that goes away cancels the upstream request within 2 s


def test_disconnect_cancels_a_non_streaming_upstream_request(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.reset("hang")
    aborted = client_aborts(proxy)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + CHAT, content=chat_body(), headers=JSON, timeout=0.5)
    gone = time.monotonic()
    assert upstream.disconnected.wait(3)
    assert upstream.disconnected_at is not None
    assert upstream.disconnected_at - gone < 2
    assert client_aborts(proxy) == aborted + 1  # counted as the client's abort


def client_aborts(proxy: Proxy) -> float:
    text = httpx.get(proxy.url + "/metrics").text
    line = 'railproxy_upstream_responses_total{outcome="client_abort",status="499"} '
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith(line))


def test_disconnect_cancels_a_streaming_upstream_request(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.reset("hang_after_first")
    with httpx.stream(
        "POST", proxy.url + CHAT, content=chat_body(stream=True), headers=JSON, timeout=5
    ) as response:
        first = next(response.iter_raw())
        assert b"ECHO" in first
    gone = time.monotonic()
    assert upstream.disconnected.wait(3)
    assert upstream.disconnected_at is not None
    assert upstream.disconnected_at - gone < 2


# ---- overload, auth, cookies, a broken guard


def test_beyond_max_in_flight_is_503_at_once(
    guards: dict[str, Guard], upstream_url: str, upstream: FakeUpstream
) -> None:
    upstream.reset("hang")
    with running_proxy(guards["message"], upstream_url, server={"max_in_flight": 1}) as proxy:

        def hold() -> None:
            with pytest.raises(httpx.ReadTimeout):
                post_with_timeout(proxy, 2)

        holder = threading.Thread(target=hold)
        holder.start()
        deadline = time.monotonic() + 3
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        response = post(proxy)
        elapsed = time.monotonic() - started
        holder.join()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"
    assert response.headers["retry-after"] == "1"
    assert elapsed < 1
    assert len(upstream.requests) == 1


def post_with_timeout(proxy: Proxy, seconds: float) -> httpx.Response:
    return httpx.post(proxy.url + CHAT, content=chat_body(), headers=JSON, timeout=seconds)


def test_client_keys_are_required_and_never_forwarded(
    guards: dict[str, Guard], upstream_url: str, upstream: FakeUpstream
) -> None:
    with running_proxy(guards["message"], upstream_url, client_keys=("rp-good-key",)) as proxy:
        missing = post(proxy)
        wrong = httpx.post(
            proxy.url + CHAT,
            content=chat_body(),
            headers={**JSON, "authorization": "Bearer rp-bad-key"},
        )
        models = httpx.get(proxy.url + "/v1/models")
        health = httpx.get(proxy.url + "/healthz")
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="rp-good-key", max_retries=0)
        completion = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "where is my refund"}]
        )
    for refused in (missing, wrong, models):
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert "x-request-id" in refused.headers
    assert health.status_code == 200
    assert completion.choices[0].message.content
    assert len(upstream.requests) == 1
    assert b"rp-good-key" not in upstream.everything()


def test_upstream_cookies_are_never_kept(proxy: Proxy, upstream: FakeUpstream) -> None:
    first = post(proxy)
    second = post(proxy)
    assert "set-cookie" not in first.headers
    assert second.status_code == 200
    assert [r.header("cookie") for r in upstream.requests] == [None, None]


class BreakableEmbedder:
    """The real model, until `broken` is set: then embedding raises (a seam fake)."""

    def __init__(self, real: Embedder) -> None:
        self.real = real
        self.broken = False
        self.name = real.name
        self.dimension = real.dimension
        self.max_tokens = real.max_tokens

    def count_tokens(self, text: str) -> int:
        return self.real.count_tokens(text)

    def embed(self, texts: Sequence[str]) -> Vectors:
        if self.broken:
            raise RuntimeError("the model fell over")
        return self.real.embed(texts)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_broken_guard_fails_closed(
    guards: dict[str, Guard],
    embedder: Embedder,
    upstream_url: str,
    upstream: FakeUpstream,
    stream: bool,
) -> None:
    breakable = BreakableEmbedder(embedder)
    guard = Guard(guards["message"].root, breakable)
    with running_proxy(guard, upstream_url) as proxy:
        breakable.broken = True
        response = post(proxy, stream=stream)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "guard_unavailable"
    assert response.headers["retry-after"] == "1"
    assert upstream.requests == []


def test_path_and_query_never_reach_upstream(proxy: Proxy, upstream: FakeUpstream) -> None:
    response = raw_request(
        proxy.url, "POST", CHAT + "?api_base=http://evil&x=QUERY", chat_body(), JSON
    )
    assert response.status == 200
    assert upstream.requests[0].path == "/v1/chat/completions"
    assert upstream.requests[0].query == b""
