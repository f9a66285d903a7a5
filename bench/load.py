"""Load test: N concurrent clients for M seconds against `railproxy serve`, on loopback.

Three processes, all on 127.0.0.1: a fake OpenAI upstream (asyncio, no framework: a
JSON completion or an SSE stream, each after a small delay so that clients can drop a
request while it is still upstream), the real `railproxy serve` (real model, real index,
an audit log on) pointed at it, and this client. Each client loops, picking a request
from a weighted mix until the time is up:

| kind       | variants                                                | expected                |
|------------|---------------------------------------------------------|-------------------------|
| approved   | approved_json, approved_stream                          | 200 prompt, [DONE]      |
| refused    | refused (JSON or stream)                                | 200 refuse              |
| reply      | reply                                                   | 200 reply               |
| no_match   | no_match                                                | 200 no_match            |
| malformed  | bad_json, wrong_types, wrong_content_type               | 400, 400, 415           |
| disconnect | disconnect_early (before the answer), disconnect_stream | the client drops it     |
|            | (after the first event), disconnect_body (mid-body)     |                         |

Every request gets a unique marker in its text. The proxy sets a fresh `x-request-id`
on every response and ignores the client's, so requests are matched to the server by
the id they got back; a request dropped before its answer has no id, and is matched by
count against the server's access log (`railproxy.access`, one line per request with
its id). The audit log is then joined to the access log by id. Checked:

1. every request has exactly one terminal outcome at the client;
2. no unexpected outcome (a status outside the variant's expected set, any 5xx, a
   transport error or timeout on a request the client did not drop);
3. none lost: the server logged every request once, and each of them has exactly one
   audit record (none missing, none duplicated, none for a request nobody sent), whose
   status agrees with what the client saw;
4. the `railproxy_in_flight` gauge is back to 0 once the clients are done;
5. the server's memory is stable: RSS (VmRSS of the `railproxy serve` process) grows by
   at most `--max-rss-growth-mib` between the end of the first quarter of the load
   (allocator and caches warmed) and the end.

    .venv/bin/python bench/load.py [--clients 16] [--seconds 20] [--json]
    .venv/bin/python bench/load.py --mix disconnect_body=0,wrong_content_type=0
    .venv/bin/python bench/load.py --ledger /tmp/ledger.jsonl   # every request's outcome

Prints a table (or JSON with `--json`) and exits 1 if any check fails. Bounded: start-up
(model load) plus `seconds` plus a drain of at most `--drain` seconds, under a hard
deadline (SIGALRM); the servers are stopped (their process groups killed) on every exit
path, Ctrl-C included. Loopback only; nothing leaves the machine. Figures depend on the
machine and on what else shares its CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
PROMPT = "Explain how an ACME customer checks the status of a refund in the web portal."
RAILS = {
    "billing.yaml": f"""\
intents:
  - name: refund_status
    examples: [where is my refund, has my refund been processed yet, when will I get my money back]
    prompt: "{PROMPT}"
  - name: medical_advice
    examples: [what medicine should I take for a headache, can you diagnose my rash]
    refuse: I can't give medical advice.
  - name: greeting
    examples: [hi, hello there, good morning]
    reply: Hi! I can help with ACME billing questions.
""",
}
APPROVED_TEXTS = (
    "where is my refund for order {m}",
    "has my refund for order {m} been processed yet",
    "when will I get my money back for ticket {m}",
)
REFUSED_TEXTS = (
    "what medicine should I take for a headache, case {m}",
    "can you diagnose my rash, case {m}",
)
NO_MATCH_TEXTS = (
    "what is the capital of france, quiz {m}",
    "write a poem about pirates, number {m}",
    "how tall is mount everest, question {m}",
)
REPLY_TEXTS = ("hi", "hello there", "good morning", "hi there", "hello")  # decision-cache hits
ANSWER = {
    "id": "chatcmpl-load",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Open the portal."},
            "finish_reason": "stop",
        }
    ],
}


@dataclass(frozen=True)
class Variant:
    kind: str
    weight: float
    statuses: frozenset[int]  # what the client may see; empty: the client drops it
    decision: str | None  # the `decision` its audit record should carry (None: not checked)


VARIANTS: dict[str, Variant] = {
    "approved_json": Variant("approved", 3, frozenset({200}), "prompt"),
    "approved_stream": Variant("approved", 2, frozenset({200}), "prompt"),
    "refused": Variant("refused", 2, frozenset({200}), "refuse"),
    "reply": Variant("reply", 1, frozenset({200}), "reply"),
    "no_match": Variant("no_match", 2, frozenset({200}), "no_match"),
    "bad_json": Variant("malformed", 1, frozenset({400}), "invalid"),
    "wrong_types": Variant("malformed", 1, frozenset({400}), "invalid"),
    "wrong_content_type": Variant("malformed", 1, frozenset({415}), None),
    "disconnect_early": Variant("disconnect", 1, frozenset(), "prompt"),
    "disconnect_stream": Variant("disconnect", 1, frozenset(), "prompt"),
    "disconnect_body": Variant("disconnect", 1, frozenset(), None),
}
DECISION_FOR_VARIANT = {
    "approved_json": "prompt",
    "approved_stream": "prompt",
    "refused": "refuse",
    "reply": "reply",
    "no_match": "no_match",
}


class HardDeadline(SystemExit):
    """The whole run took longer than its bound (a SystemExit, so asyncio lets it through)."""


# ---- the fake upstream (runs in its own process)


def upstream_main(port: int, delay: float, event_delay: float, events: int) -> None:
    """A keep-alive HTTP/1.1 upstream: POST -> JSON or SSE after `delay` s; GET /stats."""
    completion = json.dumps(ANSWER).encode()
    event = b'data: {"choices":[{"index":0,"delta":{"content":"word "}}]}\n\n'
    stats = {"received": 0, "answered": 0, "aborted": 0, "json": 0, "stream": 0}

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    def check_open(writer: asyncio.StreamWriter) -> None:
        if writer.transport.is_closing():
            raise ConnectionResetError("the proxy closed the connection")

    async def answer(writer: asyncio.StreamWriter, stream: bool) -> None:
        await asyncio.sleep(delay)
        check_open(writer)
        if not stream:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(completion)).encode()
                + b"\r\n\r\n"
                + completion
            )
            await writer.drain()
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for position in range(events):
            if position:
                await asyncio.sleep(event_delay)
            check_open(writer)
            writer.write(chunk(event))
            await writer.drain()
        check_open(writer)
        writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                method, path = lines[0].split(b" ")[:2]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length)
                if method == b"GET" and path == b"/stats":
                    data = json.dumps(stats).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data
                    )
                    await writer.drain()
                    continue
                stats["received"] += 1
                try:
                    stream = bool(json.loads(body).get("stream"))
                except (ValueError, AttributeError):
                    stream = False
                stats["stream" if stream else "json"] += 1
                try:
                    await answer(writer, stream)
                except ConnectionError:
                    stats["aborted"] += 1
                    raise
                stats["answered"] += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, HOST, port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Child:
    """A child process in its own process group, output to `log`; `stop()` ends the group."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self.process.pid

    def stop(self, wait: float = 20) -> int | None:
        """SIGTERM the group, then SIGKILL it after `wait` s; the exit code."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # whatever is left in the group
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        return self.process.returncode


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """The children started inside; all stopped on the way out, whatever happened."""
    started: list[Child] = []
    try:
        yield started
    finally:
        signal.alarm(0)  # nothing may interrupt the clean-up itself
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for process in reversed(started):
                process.stop()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def wait_ready(url: str, process: Child, limit: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if process.process.poll() is not None:
            raise SystemExit(f"{url}: the server exited:\n{process.log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {limit:g} s:\n{process.log.read_text()[-3000:]}")


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---- the client side


@dataclass
class Entry:
    """One request, from the client's point of view."""

    seq: int
    client: int
    variant: str
    kind: str
    started: float
    ended: float | None = None
    outcome: str | None = None  # the terminal outcome; set exactly once
    expected: bool = False
    status: int | None = None
    request_id: str | None = None
    decision: str | None = None
    detail: str = ""
    terminals: int = 0

    def finish(
        self,
        outcome: str,
        *,
        expected: bool,
        status: int | None = None,
        request_id: str | None = None,
        decision: str | None = None,
        detail: str = "",
    ) -> None:
        self.terminals += 1
        if self.terminals > 1:  # a second terminal outcome is itself a failure, keep the first
            return
        self.ended = time.perf_counter()
        self.outcome, self.expected, self.status = outcome, expected, status
        self.request_id, self.decision, self.detail = request_id, decision, detail[:200]


def chat(text: str, stream: bool = False) -> bytes:
    return json.dumps(
        {"model": "any", "messages": [{"role": "user", "content": text}], "stream": stream}
    ).encode()


def raw_request(port: int, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return status, headers


class Load:
    """The clients, their ledger, and the samplers."""

    def __init__(self, args: argparse.Namespace, port: int, server_pid: int) -> None:
        self.args = args
        self.port = port
        self.url = f"http://{HOST}:{port}{CHAT_PATH}"
        self.server_pid = server_pid
        self.ledger: list[Entry] = []
        self.rss: list[tuple[float, float]] = []  # (seconds into the load, MiB)
        self.in_flight: list[tuple[float, float]] = []
        self.seq = 0
        self.started = time.perf_counter()
        self.random = random.Random(args.seed)
        names = [name for name, weight in args.weights.items() if weight > 0]
        self.names = names
        self.weights = [args.weights[name] for name in names]
        self.timeout = args.request_timeout

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def run(self) -> float:
        limits = httpx.Limits(
            max_connections=self.args.clients + 4, max_keepalive_connections=self.args.clients + 4
        )
        async with httpx.AsyncClient(limits=limits, timeout=self.timeout, trust_env=False) as c:
            self.started = time.perf_counter()
            stop_at = self.started + self.args.seconds
            samplers = [
                asyncio.create_task(self.sample_rss()),
                asyncio.create_task(self.sample_in_flight(c)),
            ]
            workers = [
                asyncio.create_task(self.client(c, number, stop_at))
                for number in range(self.args.clients)
            ]
            done, pending = await asyncio.wait(workers, timeout=self.args.seconds + self.args.drain)
            for task in pending:  # past the drain bound: cancel (their entries stay unfinished)
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            elapsed = time.perf_counter() - self.started
            for task in samplers:
                task.cancel()
            await asyncio.gather(*samplers, return_exceptions=True)
            for task in done:
                failure = task.exception()
                if failure is not None:
                    raise failure
        return elapsed

    async def client(self, c: httpx.AsyncClient, number: int, stop_at: float) -> None:
        rng = random.Random(self.random.random())
        bound = int(self.args.seconds * 2000) + 1  # a bound on the count as well as the time
        for _ in range(bound):
            if time.perf_counter() >= stop_at:
                return
            variant = rng.choices(self.names, self.weights)[0]
            seq = self.next_seq()
            entry = Entry(seq, number, variant, VARIANTS[variant].kind, time.perf_counter())
            self.ledger.append(entry)
            marker = f"{number}-{seq}"
            try:
                await asyncio.wait_for(self.one(c, entry, marker, rng), self.timeout + 5)
            except TimeoutError:
                entry.finish("timeout", expected=False, detail="no answer in time")
            except (httpx.TransportError, OSError, asyncio.IncompleteReadError) as exc:
                entry.finish("transport_error", expected=False, detail=repr(exc))
            except asyncio.CancelledError:
                entry.finish("cancelled", expected=False, detail="cancelled at the drain bound")
                raise

    async def one(
        self, c: httpx.AsyncClient, entry: Entry, marker: str, rng: random.Random
    ) -> None:
        variant = entry.variant
        if variant == "approved_json":
            await self.send(c, entry, chat(rng.choice(APPROVED_TEXTS).format(m=marker)))
        elif variant == "approved_stream":
            body = chat(rng.choice(APPROVED_TEXTS).format(m=marker), stream=True)
            await self.send(c, entry, body, stream=True)
        elif variant == "refused":
            stream = rng.random() < 0.5
            body = chat(rng.choice(REFUSED_TEXTS).format(m=marker), stream=stream)
            await self.send(c, entry, body, stream=stream)
        elif variant == "reply":
            await self.send(c, entry, chat(rng.choice(REPLY_TEXTS)))
        elif variant == "no_match":
            await self.send(c, entry, chat(rng.choice(NO_MATCH_TEXTS).format(m=marker)))
        elif variant == "bad_json":
            body = b'{"model": "any", "messages": [{"role": "user", "content": "where is my '
            await self.send(c, entry, body + marker.encode())
        elif variant == "wrong_types":
            wrong: list[dict[str, Any]] = [
                {"model": "any", "messages": f"where is my refund {marker}"},
                {"model": "any", "messages": [{"role": "user", "content": 7}]},
                {"messages": [{"role": "user", "content": marker}], "temperature": "hot"},
                {"model": "any", "messages": [], "stream": "yes"},
            ]
            await self.send(c, entry, json.dumps(rng.choice(wrong)).encode())
        elif variant == "wrong_content_type":
            body = chat(rng.choice(APPROVED_TEXTS).format(m=marker))
            await self.send(c, entry, body, content_type="text/plain")
        elif variant == "disconnect_early":
            body = chat(rng.choice(APPROVED_TEXTS).format(m=marker), stream=rng.random() < 0.5)
            await self.drop_early(entry, body, rng.uniform(0.0, self.args.upstream_delay * 1.5))
        elif variant == "disconnect_stream":
            await self.drop_mid_stream(entry, chat(APPROVED_TEXTS[0].format(m=marker), True))
        elif variant == "disconnect_body":
            await self.drop_mid_body(entry, chat(APPROVED_TEXTS[1].format(m=marker)), rng)
        else:
            raise AssertionError(variant)

    async def send(
        self,
        c: httpx.AsyncClient,
        entry: Entry,
        body: bytes,
        *,
        stream: bool = False,
        content_type: str = "application/json",
    ) -> None:
        headers = {"content-type": content_type}
        async with c.stream("POST", self.url, content=body, headers=headers) as response:
            data = await response.aread()
        status = response.status_code
        request_id = response.headers.get("x-request-id")
        decision = response.headers.get("x-railproxy-decision")
        spec = VARIANTS[entry.variant]
        problems = []
        if status not in spec.statuses:
            problems.append(f"status {status}: {data[:120]!r}")
        want = DECISION_FOR_VARIANT.get(entry.variant)
        if want is not None and status == 200 and decision != want:
            problems.append(f"decision {decision}, expected {want}")
        if stream and status == 200 and not data.rstrip().endswith(b"data: [DONE]"):
            problems.append(f"stream without [DONE]: {data[-120:]!r}")
        if not request_id:
            problems.append("no x-request-id")
        outcome = "completed" if status < 400 else "rejected"
        if problems:
            outcome = "unexpected"
        entry.finish(
            outcome,
            expected=not problems,
            status=status,
            request_id=request_id,
            decision=decision,
            detail="; ".join(problems),
        )

    async def open(self, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        writer.write(data)
        await writer.drain()
        return reader, writer

    @staticmethod
    async def close(writer: asyncio.StreamWriter) -> None:
        writer.close()  # the disconnect itself
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    def dropped(
        self, entry: Entry, outcome: str, status: int | None, headers: dict[str, str]
    ) -> None:
        expected = status is None or status == 200
        entry.finish(
            outcome,
            expected=expected,
            status=status,
            request_id=headers.get("x-request-id"),
            decision=headers.get("x-railproxy-decision"),
            detail="" if expected else f"status {status} before the drop",
        )

    async def drop_early(self, entry: Entry, body: bytes, after: float) -> None:
        """Send a whole approved request, then drop it after `after` s, answered or not."""
        reader, writer = await self.open(raw_request(self.port, body))
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), after)
            except TimeoutError:
                self.dropped(entry, "dropped_before_headers", None, {})
                return
            status, headers = parse_head(head)
            self.dropped(entry, "dropped_after_headers", status, headers)
        finally:
            await self.close(writer)

    async def drop_mid_stream(self, entry: Entry, body: bytes) -> None:
        """Open an approved stream, read its first event, then drop it."""
        reader, writer = await self.open(raw_request(self.port, body))
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            status, headers = parse_head(head)
            if status != 200:
                self.dropped(entry, "dropped_after_headers", status, headers)
                return
            data = b""
            while b"data:" not in data:
                more = await asyncio.wait_for(reader.read(65536), self.timeout)
                if not more:
                    break
                data += more
            outcome = "completed_before_drop" if b"[DONE]" in data else "dropped_mid_stream"
            self.dropped(entry, outcome, status, headers)
        finally:
            await self.close(writer)

    async def drop_mid_body(self, entry: Entry, body: bytes, rng: random.Random) -> None:
        """Declare the whole body, send half of it, then drop the connection."""
        request = raw_request(self.port, body)
        _, writer = await self.open(request[: len(request) - len(body) // 2])
        try:
            await asyncio.sleep(rng.uniform(0.01, 0.1))
            self.dropped(entry, "dropped_mid_body", None, {})
        finally:
            await self.close(writer)

    async def sample_rss(self) -> None:
        while True:
            value = rss_mib(self.server_pid)
            if value is not None:
                self.rss.append((time.perf_counter() - self.started, value))
            await asyncio.sleep(self.args.sample_every)

    async def sample_in_flight(self, c: httpx.AsyncClient) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                gauge = await read_in_flight(c, self.port)
                if gauge is not None:
                    self.in_flight.append((time.perf_counter() - self.started, gauge))
            await asyncio.sleep(1.0)


async def read_in_flight(c: httpx.AsyncClient, port: int) -> float | None:
    response = await c.get(f"http://{HOST}:{port}/metrics", timeout=5)
    for line in response.text.splitlines():
        if line.startswith("railproxy_in_flight "):
            return float(line.split()[1])
    return None


async def settle(port: int, limit: float) -> tuple[float | None, float]:
    """Wait (at most `limit` s) for the in-flight gauge to read 0; (gauge, seconds waited)."""
    started = time.perf_counter()
    gauge: float | None = None
    async with httpx.AsyncClient(trust_env=False) as c:
        while time.perf_counter() - started < limit:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                gauge = await read_in_flight(c, port)
            if gauge == 0:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # let the last audit lines land
        with contextlib.suppress(httpx.HTTPError, ValueError):
            gauge = await read_in_flight(c, port)
    return gauge, time.perf_counter() - started


async def upstream_stats(port: int) -> dict[str, Any]:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        async with httpx.AsyncClient(trust_env=False) as c:
            return dict((await c.get(f"http://{HOST}:{port}/stats", timeout=5)).json())
    return {}


# ---- reconciliation

ACCESS = re.compile(
    r'railproxy\.access: "(?P<method>\S+) (?P<path>\S+)" (?P<status>\d+) (?P<ms>[\d.]+)ms '
    r"id=(?P<id>\w+) decision=(?P<decision>\S+) intent=(?P<intent>\S+)"
)


def read_access(log: Path) -> dict[str, dict[str, str]]:
    """Chat requests as the server logged them: request id -> the line's fields."""
    seen: dict[str, dict[str, str]] = {}
    duplicates = 0
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        match = ACCESS.search(line)
        if match and match["path"] == CHAT_PATH and match["method"] == "POST":
            if match["id"] in seen:
                duplicates += 1
            seen[match["id"]] = match.groupdict()
    if duplicates:
        seen["_duplicates"] = {"count": str(duplicates)}
    return seen


def read_audit(path: Path) -> tuple[list[dict[str, Any]], int]:
    records, broken = [], 0
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                broken += 1
    return records, broken


def ms_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1), "p99_ms": round(p99 * 1000, 1)}


def reconcile(
    load: Load, access: dict[str, dict[str, str]], audit: list[dict[str, Any]]
) -> dict[str, Any]:
    ledger = load.ledger
    access_duplicates = int(access.pop("_duplicates", {"count": "0"})["count"])
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in audit:
        by_id[str(record.get("request_id"))].append(record)
    known = {e.request_id: e for e in ledger if e.request_id}
    unknown_requests = [e for e in ledger if not e.request_id]
    unknown_server = [rid for rid in access if rid not in known]
    known_not_logged = [rid for rid in known if rid not in access]

    no_audit = [rid for rid in access if not by_id.get(rid)]
    duplicated = [rid for rid, records in by_id.items() if len(records) > 1]
    extra = [rid for rid in by_id if rid not in access]
    never_seen = max(0, len(ledger) - len(access))
    status_mismatch = []
    decision_mismatch = []
    outcome_mismatch = []
    for rid, entry in known.items():
        records = by_id.get(rid, [])
        if len(records) != 1:
            continue
        record = records[0]
        if entry.status is not None and record.get("status") != entry.status:
            status_mismatch.append(
                f"{entry.variant} {rid}: client {entry.status}, audit {record.get('status')}"
            )
        want = VARIANTS[entry.variant].decision
        if want is not None and record.get("decision") != want:
            decision_mismatch.append(f"{entry.variant} {rid}: audit {record.get('decision')}")
        # The client got the whole upstream answer, so the audit must say it completed.
        if entry.kind == "approved" and entry.outcome == "completed":
            if record.get("outcome") != "completed":
                outcome_mismatch.append(
                    f"{entry.variant} {rid}: client completed, audit outcome "
                    f"{record.get('outcome')}"
                )

    def describe(rid: str) -> str:
        entry = known.get(rid)
        line = access.get(rid, {})
        what = entry.variant if entry else "dropped before its answer"
        return f"{what}: server status {line.get('status')} decision {line.get('decision')}"

    no_audit_by_what = Counter(describe(rid) for rid in no_audit)
    audit_by_variant: dict[str, Counter[str]] = defaultdict(Counter)
    for rid, records in by_id.items():
        name = known[rid].variant if rid in known else "(no id at the client)"
        for record in records:
            label = f"{record.get('decision')}/{record.get('status')}"
            if record.get("outcome"):
                label += f"/{record['outcome']}"
            audit_by_variant[name][label] += 1
    unknown_by_variant = Counter(e.variant for e in unknown_requests)
    lost = len(no_audit) + len(duplicated) + never_seen
    return {
        "requests_sent": len(ledger),
        "terminal_outcomes": sum(1 for e in ledger if e.outcome is not None),
        "double_outcomes": sum(1 for e in ledger if e.terminals > 1),
        "unfinished": sum(1 for e in ledger if e.outcome is None or e.outcome == "cancelled"),
        "server_logged": len(access),
        "server_logged_twice": access_duplicates,
        "audit_records": len(audit),
        "matched_by_id": len(known) - len(known_not_logged),
        "matched_by_count": {
            "requests_without_id": len(unknown_requests),
            "server_ids_unknown_to_clients": len(unknown_server),
            "by_variant": dict(unknown_by_variant),
        },
        "client_ids_not_in_server_log": len(known_not_logged),
        "lost": lost,
        "no_audit_record": len(no_audit),
        "no_audit_record_by_what": dict(no_audit_by_what),
        "duplicate_audit_records": len(duplicated),
        "audit_records_for_unknown_requests": len(extra),
        "never_seen_by_server": never_seen,
        "audit_status_mismatch": status_mismatch[:20],
        "audit_status_mismatches": len(status_mismatch),
        "audit_decision_mismatches": len(decision_mismatch),
        "audit_outcome_mismatches": len(outcome_mismatch),
        "audit_outcome_mismatch_examples": outcome_mismatch[:10],
        "audit_decision_mismatch_examples": decision_mismatch[:10],
        "audit_by_variant": {k: dict(v) for k, v in sorted(audit_by_variant.items())},
    }


def summarise(
    load: Load,
    elapsed: float,
    reconciled: dict[str, Any],
    in_flight_after: float | None,
    rss_end: float | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    args = load.args
    per_variant: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        entries = [e for e in load.ledger if e.variant == name]
        if not entries:
            continue
        outcomes = Counter(
            f"{e.outcome}:{e.status}" if e.status is not None else str(e.outcome) for e in entries
        )
        times = [e.ended - e.started for e in entries if e.ended is not None and e.expected]
        per_variant[name] = {
            "kind": VARIANTS[name].kind,
            "sent": len(entries),
            "expected": sum(1 for e in entries if e.expected),
            "unexpected": sum(1 for e in entries if not e.expected),
            "outcomes": dict(outcomes.most_common()),
            **ms_summary(times),
        }
    unexpected = [e for e in load.ledger if not e.expected]
    five_xx = [e for e in load.ledger if e.status is not None and e.status >= 500]
    rss = [value for _, value in load.rss]
    quarter = args.seconds / 4
    after_warm = next((v for t, v in load.rss if t >= quarter), rss[-1] if rss else None)
    rss_start = rss[0] if rss else None
    peak = max([*rss, rss_end or 0.0]) if rss else rss_end
    growth = round(rss_end - rss_start, 1) if rss_end and rss_start else None
    steady = round(rss_end - after_warm, 1) if rss_end and after_warm else None
    finished = [e for e in load.ledger if e.outcome is not None]
    failures = []
    if reconciled["unfinished"] or reconciled["double_outcomes"]:
        failures.append("a request without exactly one terminal outcome")
    if unexpected:
        failures.append(f"{len(unexpected)} unexpected outcomes")
    if five_xx:
        failures.append(f"{len(five_xx)} responses with a 5xx")
    if reconciled["lost"]:
        failures.append(f"{reconciled['lost']} requests without exactly one audit record")
    if reconciled["audit_records_for_unknown_requests"]:
        failures.append("audit records for requests nobody sent")
    if reconciled["client_ids_not_in_server_log"] or reconciled["server_logged_twice"]:
        failures.append("the server's access log disagrees with the clients")
    if (
        reconciled["matched_by_count"]["requests_without_id"]
        != reconciled["matched_by_count"]["server_ids_unknown_to_clients"]
    ):
        failures.append("requests without an id do not match the server's unmatched ids")
    if reconciled["audit_status_mismatches"]:
        failures.append("audit statuses that differ from what the client saw")
    if reconciled["audit_decision_mismatches"]:
        failures.append("audit decisions that differ from the request's kind")
    if reconciled["audit_outcome_mismatches"]:
        failures.append(
            f"{reconciled['audit_outcome_mismatches']} answers the client got whole "
            "that the audit does not record as completed"
        )
    if in_flight_after != 0:
        failures.append(f"in-flight gauge is {in_flight_after} after the load")
    if steady is None or steady > args.max_rss_growth_mib:
        failures.append(f"server RSS grew {steady} MiB after warm-up (> {args.max_rss_growth_mib})")
    gauge = [value for _, value in load.in_flight]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "clients": args.clients,
        "seconds": args.seconds,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(finished) / elapsed, 1) if elapsed else 0.0,
        "by_variant": per_variant,
        "by_kind": dict(Counter(e.kind for e in load.ledger)),
        **reconciled,
        "unexpected": len(unexpected),
        "unexpected_examples": [
            f"{e.variant} {e.outcome} {e.status}: {e.detail}" for e in unexpected[:10]
        ],
        "responses_5xx": len(five_xx),
        "in_flight_after": in_flight_after,
        "in_flight_peak_sampled": max(gauge) if gauge else None,
        "rss_mib": {
            "start": round(rss_start, 1) if rss_start else None,
            "after_first_quarter": round(after_warm, 1) if after_warm else None,
            "peak": round(peak, 1) if peak else None,
            "end": round(rss_end, 1) if rss_end else None,
            "growth": growth,
            "growth_after_first_quarter": steady,
            "samples": len(rss),
        },
        **extra,
        "failures": failures,
        "ok": not failures,
    }


def report(result: dict[str, Any]) -> None:
    print(
        f"railproxy load test: {result['clients']} clients x {result['seconds']:g} s "
        f"on {result['machine']}, loopback; ready in {result['ready_s']:.1f} s"
    )
    print(
        f"{'kind':<11}{'variant':<20}{'sent':>6}{'ok':>6}{'bad':>5}{'p50 ms':>9}{'p99 ms':>9}"
        "  outcomes (outcome:status)"
    )
    for name, row in result["by_variant"].items():
        outcomes = ", ".join(f"{k} {v}" for k, v in row["outcomes"].items())
        print(
            f"{row['kind']:<11}{name:<20}{row['sent']:>6}{row['expected']:>6}"
            f"{row['unexpected']:>5}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}  {outcomes}"
        )
    unknown = result["matched_by_count"]
    print(
        f"\nrequests sent {result['requests_sent']}, terminal outcomes at the clients "
        f"{result['terminal_outcomes']} (double {result['double_outcomes']}, unfinished "
        f"{result['unfinished']}), logged by the server {result['server_logged']}, "
        f"audit records {result['audit_records']}"
    )
    print(
        f"matched: {result['matched_by_id']} by x-request-id, "
        f"{unknown['requests_without_id']} without an id against "
        f"{unknown['server_ids_unknown_to_clients']} server ids unknown to the clients"
    )
    print(
        f"lost {result['lost']}: no audit record {result['no_audit_record']}, duplicated "
        f"{result['duplicate_audit_records']}, never seen by the server "
        f"{result['never_seen_by_server']}; audit records for no request "
        f"{result['audit_records_for_unknown_requests']}; audit status mismatches "
        f"{result['audit_status_mismatches']}, decision mismatches "
        f"{result['audit_decision_mismatches']}, outcome mismatches "
        f"{result['audit_outcome_mismatches']}"
    )
    for line in result["audit_outcome_mismatch_examples"][:3]:
        print(f"  outcome mismatch: {line}")
    for what, count in result["no_audit_record_by_what"].items():
        print(f"  without an audit record: {count:>5}  {what}")
    print("audit records by variant (decision/status/outcome):")
    for name, labels in result["audit_by_variant"].items():
        print(f"  {name:<24}" + ", ".join(f"{k} {v}" for k, v in labels.items()))
    print(f"unexpected outcomes {result['unexpected']}, 5xx {result['responses_5xx']}")
    for line in result["unexpected_examples"]:
        print(f"  {line}")
    print(
        f"in-flight gauge after the load: {result['in_flight_after']} "
        f"(peak sampled during it: {result['in_flight_peak_sampled']})"
    )
    rss = result["rss_mib"]
    print(
        f"server RSS MiB: start {rss['start']}, after the first quarter "
        f"{rss['after_first_quarter']}, peak {rss['peak']}, end {rss['end']} "
        f"(growth {rss['growth']:+}, after the first quarter "
        f"{rss['growth_after_first_quarter']:+}; {rss['samples']} samples)"
        if rss["growth"] is not None and rss["growth_after_first_quarter"] is not None
        else f"server RSS MiB: {rss}"
    )
    print(
        f"throughput: {result['requests_per_s']} requests/s over {result['elapsed_s']} s; "
        f"upstream saw {result['upstream']}"
    )
    print(f"server exit code after SIGTERM: {result['server_exit']}")
    if result["ok"]:
        print("PASS: every check held")
    else:
        print("FAIL: " + "; ".join(result["failures"]))


# ---- main


def parse_mix(text: str) -> dict[str, float]:
    weights = {name: variant.weight for name, variant in VARIANTS.items()}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        names = [n for n, v in VARIANTS.items() if name.strip() in (n, v.kind)]
        if not names or not value:
            raise argparse.ArgumentTypeError(f"--mix: {item!r} is not VARIANT_OR_KIND=WEIGHT")
        for n in names:
            weights[n] = float(value)
    if not any(w > 0 for w in weights.values()):
        raise argparse.ArgumentTypeError("--mix: every weight is 0")
    return weights


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the load")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=parse_mix(""),
        dest="weights",
        help="weights, e.g. approved=4,disconnect_body=0 (variant or kind names; "
        "defaults: " + ", ".join(f"{n}={v.weight:g}" for n, v in VARIANTS.items()) + ")",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed for the mix")
    parser.add_argument("--ledger", type=Path, help="write every request's outcome (JSON lines)")
    parser.add_argument(
        "--upstream-delay", type=float, default=0.05, help="s before the upstream answers"
    )
    parser.add_argument(
        "--event-delay", type=float, default=0.02, help="s between the upstream's SSE events"
    )
    parser.add_argument("--events", type=int, default=8, help="SSE events per upstream stream")
    parser.add_argument(
        "--max-in-flight", type=int, default=64, help="the proxy's server.max_in_flight"
    )
    parser.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=48.0,
        help="allowed RSS growth from the end of the first quarter to the end",
    )
    parser.add_argument("--request-timeout", type=float, default=30.0, help="per request, s")
    parser.add_argument("--drain", type=float, default=20.0, help="s allowed after the load")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="s to start serving")
    parser.add_argument("--sample-every", type=float, default=0.5, help="RSS sampling period, s")
    parser.add_argument("--keep", type=Path, help="copy the logs and audit file here")
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients and --seconds must be positive")
    return args


def railproxy_command() -> list[str]:
    script = Path(sys.executable).parent / "railproxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "railproxy"]


def write_rails(root: Path, audit: Path, max_in_flight: int) -> None:
    root.mkdir()
    config = (
        "no_match: Sorry, I can only help with ACME billing.\n"
        "upstream_model: gpt-4o-mini\n"
        "server:\n"
        f"  audit_log: {json.dumps(str(audit))}\n"
        f"  max_in_flight: {max_in_flight}\n"
        "  reload: false\n"
    )
    (root / "config.yaml").write_text(config, encoding="utf-8")
    for name, text in RAILS.items():
        (root / name).write_text(text, encoding="utf-8")


def run(args: argparse.Namespace, folder: Path, started: list[Child]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAILPROXY_")}
    env.pop("OPENAI_API_KEY", None)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAILPROXY_UPSTREAM_API_KEY="sk-load-test-not-a-real-key",
        NO_PROXY="*",
    )
    root, audit_path = folder / "rails", folder / "audit.jsonl"
    write_rails(root, audit_path, args.max_in_flight)
    command = railproxy_command()
    subprocess.run(
        [*command, "reindex", str(root)], env=env, check=True, capture_output=True, timeout=300
    )
    up, px = free_port(), free_port()
    upstream_args = [sys.executable, __file__, "--upstream-port", str(up)]
    upstream_args += ["--upstream-delay", str(args.upstream_delay)]
    upstream_args += ["--event-delay", str(args.event_delay), "--events", str(args.events)]
    started.append(Child(upstream_args, env, folder / "upstream.log"))
    serve = [*command, "serve", str(root), "--host", HOST, "--port", str(px)]
    serve += ["--upstream", f"http://{HOST}:{up}/v1"]
    server = Child(serve, env, folder / "serve.log")
    started.append(server)
    ready = wait_ready(f"http://{HOST}:{px}/readyz", server, args.ready_timeout)
    rss_ready = rss_mib(server.pid)
    baseline = len(read_audit(audit_path)[0])  # records written before the load (none)

    load = Load(args, px, server.pid)
    elapsed = asyncio.run(load.run())
    in_flight_after, settle_s = asyncio.run(settle(px, args.drain))
    rss_end = rss_mib(server.pid)
    upstream = asyncio.run(upstream_stats(up))
    server_exit = server.stop()
    access = read_access(server.log)
    audit, broken = read_audit(audit_path)
    audit = audit[baseline:]
    reconciled = reconcile(load, access, audit)
    extra = {
        "ready_s": round(ready, 1),
        "rss_at_ready_mib": round(rss_ready, 1) if rss_ready else None,
        "settle_s": round(settle_s, 2),
        "audit_lines_unparsable": broken,
        "upstream": upstream,
        "server_exit": server_exit,
    }
    result = summarise(load, elapsed, reconciled, in_flight_after, rss_end, extra)
    if broken:
        result["failures"].append(f"{broken} audit lines are not JSON")
        result["ok"] = False
    if args.ledger:
        with args.ledger.open("w", encoding="utf-8") as out:
            for entry in load.ledger:
                out.write(json.dumps(asdict(entry)) + "\n")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        for name in ("serve.log", "upstream.log", "audit.jsonl"):
            if (folder / name).exists():
                (args.keep / name).write_bytes((folder / name).read_bytes())
    return result


def main() -> None:
    args = arguments()
    if args.upstream_port:
        upstream_main(args.upstream_port, args.upstream_delay, args.event_delay, args.events)
        return
    bound = args.ready_timeout + 300 + args.seconds + 2 * args.drain + 60  # reindex, stop, slack

    def expire(signum: int, frame: FrameType | None) -> None:
        raise HardDeadline(f"the load test ran past its bound of {bound:g} s")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGALRM, expire)
    signal.signal(signal.SIGTERM, terminate)
    signal.alarm(int(bound))
    try:
        with tempfile.TemporaryDirectory() as folder, children() as started:
            result = run(args, Path(folder), started)
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers were stopped")
    finally:
        signal.alarm(0)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
