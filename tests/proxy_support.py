"""Real servers on 127.0.0.1 for the proxy tests and the benchmark.

- `ServerThread` runs any ASGI app under uvicorn in a thread on an ephemeral port.
- `FakeUpstream` is an OpenAI-compatible upstream that records every request
  (method, path, query, headers, body) and can be told to misbehave.
- `running_proxy` runs the real railproxy app against it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn

from railproxy.asgi import Message, Receive, Scope, Send
from railproxy.embed import Embedder
from railproxy.guard import Guard
from railproxy.index import build_index
from railproxy.proxy import create_app
from railproxy.proxy_settings import ProxySettings, Secret
from railproxy.rails import load_rails

UPSTREAM_KEY = "sk-upstream-test-0123456789"
REFUND_PROMPT = "Explain how an ACME customer checks the status of a refund in the web portal."

PROXY_RAILS = {
    "billing.yaml": f"""\
intents:
  - name: refund_status
    examples:
      - where is my refund
      - has my refund been processed yet
      - when will I get my money back
    prompt: "{REFUND_PROMPT}"
  - name: medical_advice
    examples:
      - what medicine should I take for a headache
      - can you diagnose my rash
    refuse: I can't give medical advice.
  - name: greeting
    examples: [hi, hello there, good morning]
    reply: Hi! I can help with ACME billing questions.
  - name: invoice_copy
    examples: [send me a copy of my invoice, I need my last invoice]
    model: gpt-4o
    prompt:
      - role: system
        content: You are ACME's billing assistant.
      - role: user
        content: Tell the customer where to download invoices in the ACME portal.
  - name: translate_to_french
    examples: [translate this to french, how do you say this in french]
    pass_user_text: true
    prompt: "Translate into French: {{user_text}}"
""",
}


def write_proxy_rails(root: Path, embedder: Embedder, *, refusal: str = "message") -> Path:
    """PROXY_RAILS with the given refusal mode, indexed with `embedder`."""
    root.mkdir(parents=True, exist_ok=True)
    config = (
        f"refusal: {refusal}\n"
        "no_match: Sorry, I can only help with ACME billing.\n"
        "upstream_model: gpt-4o-mini\n"
    )
    (root / "config.yaml").write_text(config, encoding="utf-8")
    for name, text in PROXY_RAILS.items():
        (root / name).write_text(text, encoding="utf-8")
    build_index(load_rails(root), embedder)
    return root


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread; `url` once started."""

    def __init__(self, app: Any, *, lifespan: Literal["auto", "on", "off"] = "on") -> None:
        self.config = uvicorn.Config(
            app,
            lifespan=lifespan,
            log_level="critical",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(self.config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@dataclass(frozen=True)
class Recorded:
    """One request as the upstream saw it."""

    method: str
    path: str
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header_names(self) -> set[str]:
        return {name.decode().lower() for name, _ in self.headers}

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.decode().lower() == name:
                return value.decode()
        return None

    def all_bytes(self) -> bytes:
        """Every byte of the request that an attacker could hope to place."""
        parts = [self.method.encode(), self.path.encode(), self.query, self.body]
        for name, value in self.headers:
            parts += [name, value]
        return b"\n".join(parts)


@dataclass
class FakeUpstream:
    """An OpenAI-compatible upstream that records requests and misbehaves on demand.

    Behaviours: ok (echo the messages), status (answer `status` with a leaky body),
    garbage (200 HTML), not_completion (200 JSON without choices), hang (never
    answer), hang_after_first / close_after_first / end_without_done (streams that
    fail after one event), slow_stream (one event every `interval` s), raw (send
    `body` as it is), cookie, redirect.
    """

    behaviour: str = "ok"
    options: dict[str, Any] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnected_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self, behaviour: str = "ok", **options: Any) -> None:
        with self._lock:
            self.behaviour = behaviour
            self.options = options
            self.requests = []
            self.disconnected = threading.Event()
            self.disconnected_at = None

    def everything(self) -> bytes:
        with self._lock:
            return b"\n".join(r.all_bytes() for r in self.requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        record = Recorded(
            scope["method"],
            scope["path"],
            scope["query_string"],
            tuple((bytes(k), bytes(v)) for k, v in scope["headers"]),
            body,
        )
        with self._lock:
            self.requests.append(record)
            behaviour, options = self.behaviour, dict(self.options)
        stream = bool(json.loads(body).get("stream")) if body.startswith(b"{") else False
        await self._answer(behaviour, options, stream, record, receive, send)

    async def _answer(
        self,
        behaviour: str,
        options: Mapping[str, Any],
        stream: bool,
        record: Recorded,
        receive: Receive,
        send: Send,
    ) -> None:
        leaky = {"error": {"message": f"internal detail, key {UPSTREAM_KEY}", "code": "x"}}
        if behaviour == "status":
            headers = [(b"openai-organization", b"org-secret")]
            headers += [(k.encode(), v.encode()) for k, v in options.get("headers", {}).items()]
            await _send(send, options["status"], json.dumps(leaky).encode(), headers=headers)
        elif behaviour == "raw":  # exactly options["body"], as JSON or as an event stream
            media = b"text/event-stream" if stream else b"application/json"
            await _send(send, 200, options["body"], media=media)
        elif behaviour == "garbage":
            await _send(send, 200, b"<html>oops</html>", media=b"text/html")
        elif behaviour == "not_completion":
            await _send(send, 200, b'{"hello": "world"}')
        elif behaviour == "redirect":
            await _send(send, 307, b"", headers=[(b"location", b"http://127.0.0.1:9/elsewhere")])
        elif behaviour == "hang":
            await self._wait_disconnect(receive)
        elif behaviour in ("hang_in_body", "drip_body", "huge_body") and not stream:
            await self._json_body(behaviour, options, receive, send)
        elif stream:
            await self._stream(behaviour, options, record, receive, send)
        else:
            extra = [(b"set-cookie", b"session=upstream-cookie; Path=/")]
            await _send(send, 200, json.dumps(completion(echo(record))).encode(), headers=extra)

    async def _stream(
        self,
        behaviour: str,
        options: Mapping[str, Any],
        record: Recorded,
        receive: Receive,
        send: Send,
    ) -> None:
        start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"openai-organization", b"org-secret"),
            ],
        }
        await send(start)
        events = stream_events(echo(record))
        watch: asyncio.Task[None] | None = None
        if behaviour == "slow_stream":
            events = events[:1] + [
                chunk_event(f"tick {i} ") for i in range(options.get("count", 1000))
            ]
            # Notice the proxy closing the connection between two ticks.
            watch = asyncio.create_task(self._wait_disconnect(receive))
        for position, event in enumerate(events):
            if position == 1 and behaviour in (
                "hang_after_first",
                "close_after_first",
                "end_without_done",
            ):
                if behaviour == "hang_after_first":
                    await self._wait_disconnect(receive)
                    return
                if behaviour == "close_after_first":
                    raise RuntimeError("the fake upstream drops the connection")
                break
            if watch is not None:
                await asyncio.sleep(options.get("interval", 0.05))
                if watch.done():
                    return
            await send({"type": "http.response.body", "body": event, "more_body": True})
        else:
            if behaviour != "slow_stream":
                await send(
                    {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True}
                )
        if watch is not None:
            watch.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _json_body(
        self, behaviour: str, options: Mapping[str, Any], receive: Receive, send: Send
    ) -> None:
        """A 200 JSON answer whose body stalls, drips, or never stops growing."""
        start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
        await send(start)
        await send({"type": "http.response.body", "body": b'{"choices": [', "more_body": True})
        watch = asyncio.create_task(self._wait_disconnect(receive))
        try:
            if behaviour == "hang_in_body":
                await watch
                return
            while not watch.done():  # until the proxy gives up and hangs up
                await asyncio.sleep(options.get("interval", 0.0))
                chunk = b" " * (1 if behaviour == "drip_body" else 1024 * 1024)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            watch.cancel()

    async def _wait_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected_at = time.monotonic()
        self.disconnected.set()


async def _send(
    send: Send,
    status: int,
    body: bytes,
    *,
    media: bytes = b"application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    raw = [(b"content-type", media), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def echo(record: Recorded) -> str:
    """The fake model's answer: the messages it was sent."""
    messages = record.json().get("messages", [])
    return "ECHO " + " | ".join(f"{m['role']}: {m['content']}" for m in messages)


def completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chunk_event(content: str, *, finish: str | None = None) -> bytes:
    delta = {"content": content} if finish is None else {}
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def stream_events(text: str) -> list[bytes]:
    words = text.split(" ")
    return [chunk_event(w + " ") for w in words] + [chunk_event("", finish="stop")]


@dataclass(frozen=True)
class Proxy:
    url: str
    server: ServerThread


@contextmanager
def running_proxy(
    guard: Guard,
    upstream_url: str | None,
    *,
    client_keys: tuple[str, ...] = (),
    server: Mapping[str, Any] | None = None,
) -> Iterator[Proxy]:
    """The real railproxy app under uvicorn on 127.0.0.1."""
    settings = ProxySettings(
        rails_dir=guard.root,
        upstream_url=upstream_url,
        upstream_api_key=Secret(UPSTREAM_KEY),
        client_keys=tuple(Secret(k) for k in client_keys),
        server={"reload": False, **(server or {})},
    )
    with ServerThread(create_app(settings, guard=guard)) as thread:
        yield Proxy(thread.url, thread)


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    url: str,
    method: str,
    path: str,
    body: bytes | Iterator[bytes] = b"",
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = 10,
) -> RawResponse:
    """One request with the path sent exactly as given (httpx would normalise it)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        chunked = not isinstance(body, bytes)
        conn.request(method, path, body=body, headers=dict(headers or {}), encode_chunked=chunked)
        response = conn.getresponse()
        data = response.read()
        found = {k.lower(): v for k, v in response.getheaders()}
        return RawResponse(response.status, found, data)
    finally:
        conn.close()


def chat_body(text: str = "where is my refund", **fields: Any) -> bytes:
    return json.dumps(
        {"model": "client-model", "messages": [{"role": "user", "content": text}], **fields}
    ).encode()
