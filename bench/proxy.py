"""What the proxy costs: `railproxy serve` against a local fake upstream, on loopback.

Three processes: a fake OpenAI upstream (asyncio, no framework: a fixed JSON
completion, or five SSE events), the real `railproxy serve` (real model, real
index) pointed at it, and this client (httpx, keep-alive). Measured:

1. added latency, approved: the same exchange sent straight to the upstream and
   through railproxy, interleaved one by one, distinct prompts (every request
   runs the guard; no decision-cache hits), p50/p99 of each and of the
   per-pair difference; the same for streamed answers (time to the last byte);
2. GET /healthz (the HTTP server alone), a repeated prompt (decision-cache hit), and
   a refusal (answered locally);
3. requests/s through railproxy at concurrency 1 and 16 (distinct approved prompts).

    .venv/bin/python bench/proxy.py [--requests 300] [--seconds 5] [--json]

Bounded: about `requests` x 6 requests plus 2 x `seconds` of load, typically
under a minute. Loopback only; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

PROMPT = "Explain how an ACME customer checks the status of a refund in the web portal."
RAILS = {
    "config.yaml": (
        "no_match: Sorry, I can only help with ACME billing.\nupstream_model: gpt-4o-mini\n"
    ),
    "billing.yaml": f"""\
intents:
  - name: refund_status
    examples: [where is my refund, has my refund been processed yet, when will I get my money back]
    prompt: "{PROMPT}"
  - name: medical_advice
    examples: [what medicine should I take for a headache, can you diagnose my rash]
    refuse: I can't give medical advice.
""",
}
UPSTREAM_BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
ANSWER = {
    "id": "chatcmpl-bench",
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


# ---- the fake upstream (runs in its own process)


def upstream_main(port: int) -> None:
    completion = json.dumps(ANSWER).encode()
    event = b'data: {"choices":[{"index":0,"delta":{"content":"word "}}]}\n\n'
    sse = event * 5 + b"data: [DONE]\n\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                stream = b'"stream":true' in body.replace(b" ", b"")
                payload, kind = (
                    (sse, b"text/event-stream") if stream else (completion, b"application/json")
                )
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: "
                    + kind
                    + b"\r\ncontent-length: "
                    + str(len(payload)).encode()
                    + b"\r\n\r\n"
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ---- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def child(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process whose output goes to `log` (a pipe nobody reads would block it)."""
    with log.open("wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, limit: float = 120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {limit} s")


def chat(text: str, stream: bool = False) -> bytes:
    return json.dumps(
        {"model": "any", "messages": [{"role": "user", "content": text}], "stream": stream}
    ).encode()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50": round(statistics.median(ms), 2), "p99": round(pct(ms, 0.99), 2), "n": len(ms)}


Timed = Callable[[], Awaitable[httpx.Response]]


async def timed(call: Timed, expect: str | None = None) -> float:
    started = time.perf_counter()
    response = await call()
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or (
        expect and response.headers.get("x-railproxy-decision") != expect
    ):
        raise SystemExit(f"unexpected answer {response.status_code}: {response.text[:300]}")
    return elapsed


# ---- the measurements


async def measure(proxy: str, upstream: str, requests: int, seconds: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    headers = {"content-type": "application/json"}
    direct_body = {
        False: json.dumps({**UPSTREAM_BODY, "stream": False}).encode(),
        True: json.dumps({**UPSTREAM_BODY, "stream": True}).encode(),
    }
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        def direct(stream: bool) -> Timed:
            return lambda: client.post(upstream, content=direct_body[stream], headers=headers)

        def proxied(text: str, stream: bool = False) -> Timed:
            return lambda: client.post(proxy, content=chat(text, stream), headers=headers)

        for i in range(20):  # warm both paths and the connection pool
            await timed(direct(False))
            await timed(proxied(f"where is my refund for warm-up order {i}"), "prompt")
        result: dict[str, Any] = {}
        for stream in (False, True):
            d, p = [], []
            for i in range(requests):
                d.append(await timed(direct(stream)))
                p.append(
                    await timed(
                        proxied(f"where is my refund for order {i}-{stream}", stream), "prompt"
                    )
                )
            key = "stream" if stream else "json"
            result[f"direct_{key}_ms"] = summary(d)
            result[f"proxied_{key}_ms"] = summary(p)
            result[f"added_{key}_ms"] = summary([b - a for a, b in zip(d, p, strict=True)])
        health = proxy.rsplit("/v1/", 1)[0] + "/healthz"  # the server's floor: no guard
        result["healthz_ms"] = summary(
            [await timed(lambda: client.get(health)) for _ in range(requests)]
        )
        result["cached_ms"] = summary(
            [await timed(proxied("where is my refund"), "prompt") for _ in range(requests)]
        )
        result["refusal_ms"] = summary(
            [
                await timed(
                    proxied(f"what medicine should I take for a headache, case {i}"), "refuse"
                )
                for i in range(requests)
            ]
        )
        for concurrency in (1, 16):
            result[f"rps_c{concurrency}"] = await throughput(
                client, proxy, concurrency, seconds, requests
            )
    return result


async def throughput(
    client: httpx.AsyncClient, proxy: str, concurrency: int, seconds: float, cap: int
) -> dict[str, float]:
    counter = iter(range(10**9))
    done = errors = 0
    deadline = time.perf_counter() + seconds
    limit = cap * 10  # a bound on the count as well as the time

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline and done + errors < limit:
            body = chat(f"has my refund been processed yet, ticket {next(counter)}")
            response = await client.post(
                proxy, content=body, headers={"content-type": "application/json"}
            )
            if response.status_code == 200:
                done += 1
            else:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "rps": round(done / elapsed, 1),
        "ok": done,
        "errors": errors,
        "seconds": round(elapsed, 2),
    }


def report(result: dict[str, Any]) -> None:
    print(f"railproxy proxy bench on {platform.machine()}, {os.cpu_count()} cores, loopback")
    print(f"ready in {result['ready_s']:.1f} s (model load + warm-up)")
    print(f"{'':34}{'p50 ms':>10}{'p99 ms':>10}")
    rows = [
        ("direct upstream, JSON", "direct_json_ms"),
        ("through railproxy, JSON", "proxied_json_ms"),
        ("added by railproxy, JSON", "added_json_ms"),
        ("direct upstream, SSE", "direct_stream_ms"),
        ("through railproxy, SSE", "proxied_stream_ms"),
        ("added by railproxy, SSE", "added_stream_ms"),
        ("GET /healthz (HTTP only, no guard)", "healthz_ms"),
        ("approved, decision cached", "cached_ms"),
        ("refusal (answered locally)", "refusal_ms"),
    ]
    for label, key in rows:
        print(f"{label:34}{result[key]['p50']:>10.2f}{result[key]['p99']:>10.2f}")
    for c in (1, 16):
        r = result[f"rps_c{c}"]
        counts = f"({r['ok']} ok, {r['errors']} errors)"
        print(f"requests/s at concurrency {c:<2}: {r['rps']:>8.1f}  {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="requests per latency series")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_port:
        upstream_main(args.upstream_port)
        return
    env = {**os.environ, "RAILPROXY_RELOAD": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("RAILPROXY_API_KEYS", None)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "rails"
        root.mkdir()
        for name, text in RAILS.items():
            (root / name).write_text(text, encoding="utf-8")
        subprocess.run(
            [sys.executable, "-m", "railproxy", "reindex", str(root)],
            env=env,
            check=True,
            capture_output=True,
        )
        up, px = free_port(), free_port()
        serve = [
            sys.executable,
            "-m",
            "railproxy",
            "serve",
            str(root),
            "--port",
            str(px),
            "--upstream",
            f"http://127.0.0.1:{up}/v1",
        ]
        with (
            child([sys.executable, __file__, "--upstream-port", str(up)], env, root / "up.log"),
            child(serve, env, root / "serve.log") as proxy_process,
        ):
            ready = wait_ready(f"http://127.0.0.1:{px}/readyz", proxy_process, root / "serve.log")
            result = asyncio.run(
                measure(
                    f"http://127.0.0.1:{px}/v1/chat/completions",
                    f"http://127.0.0.1:{up}/v1/chat/completions",
                    args.requests,
                    args.seconds,
                )
            )
    result["ready_s"] = round(ready, 2)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    main()
