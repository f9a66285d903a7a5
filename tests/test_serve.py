"""Serve-time settings, logs that keep secrets, the demo upstream, and `railproxy serve` itself."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner

from railproxy.cli import cli
from railproxy.demo import BANNER
from railproxy.embed import Embedder
from railproxy.guard import Guard
from railproxy.index import build_index, index_dir
from railproxy.proxy_settings import ProxySettings, Secret, SettingsError, check_upstream_url
from railproxy.rails import load_rails
from railproxy.serve import Redact
from railproxy.settings import ServerConfig
from tests.conftest import RailsFactory
from tests.proxy_support import (
    REFUND_PROMPT,
    UPSTREAM_KEY,
    FakeUpstream,
    running_proxy,
    write_proxy_rails,
)

pytest_plugins = ["tests.proxy_fixtures"]


def test_settings_from_env_keep_secrets_out_of_repr(tmp_path: Path) -> None:
    env = {
        "OPENAI_API_KEY": "sk-fallback-key",
        "RAILPROXY_API_KEYS": " rp-one , rp-two ,",
        "RAILPROXY_MAX_IN_FLIGHT": "4",
        "RAILPROXY_TIMEOUT_UPSTREAM_FIRST_BYTE": "7.5",
    }
    settings = ProxySettings.from_env(tmp_path, environ=env, upstream_url="https://api.x/v1/")
    assert settings.upstream_url == "https://api.x/v1"
    assert settings.upstream_api_key is not None
    assert settings.upstream_api_key.reveal() == "sk-fallback-key"
    assert [k.reveal() for k in settings.client_keys] == ["rp-one", "rp-two"]
    for secret in ("sk-fallback-key", "rp-one", "rp-two"):
        assert secret not in repr(settings) and secret not in str(settings)
    server = settings.server_config(ServerConfig())
    assert (server.max_in_flight, server.timeouts.upstream_first_byte) == (4, 7.5)
    assert server.timeouts.guard == ServerConfig().timeouts.guard


def test_upstream_key_prefers_the_railproxy_variable(tmp_path: Path) -> None:
    env = {"OPENAI_API_KEY": "sk-a", "RAILPROXY_UPSTREAM_API_KEY": "sk-b"}
    settings = ProxySettings.from_env(tmp_path, environ=env)
    assert settings.upstream_api_key is not None and settings.upstream_api_key.reveal() == "sk-b"
    assert settings.upstream_url is None  # the demo upstream


def test_invalid_overrides_are_named(tmp_path: Path) -> None:
    settings = ProxySettings(tmp_path, server={"max_in_flight": "many"})
    with pytest.raises(SettingsError, match="max_in_flight"):
        settings.server_config(ServerConfig())


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x/v1",
        "https://user:pw@api.x/v1",
        "https://api.x/v1?key=sk-1",
        "https://api.x/v1#f",
        "http:///v1",
    ],
    ids=["scheme", "userinfo", "query", "fragment", "no-host"],
)
def test_upstream_urls_that_could_hide_things_are_refused(url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        check_upstream_url(url)
    assert "pw" not in str(caught.value) and "sk-1" not in str(caught.value)


def test_redaction_masks_keys_and_key_shapes() -> None:
    record = logging.LogRecord(
        "x",
        logging.INFO,
        "f",
        1,
        "keys %s %s %s",
        ("rp-client-key", "sk-abcdefghijk", "Bearer t0k"),
        None,
    )
    Redact(["rp-client-key"]).filter(record)
    assert record.getMessage() == "keys [redacted] [redacted] Bearer [redacted]"
    assert repr(Secret("sk-abcdefghijk")) == "Secret('**********')"


def test_logs_hold_no_prompt_key_or_query(
    guards: dict[str, Guard],
    upstream_url: str,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with running_proxy(guards["message"], upstream_url, client_keys=("rp-client-key",)) as proxy:
        httpx.post(
            proxy.url + "/v1/chat/completions?secret=QUERY-CANARY",
            json={"messages": [{"role": "user", "content": "where is my refund PROMPT-CANARY"}]},
            headers={"authorization": "Bearer rp-client-key"},
        )
        upstream.reset("status", status=401)
        httpx.post(
            proxy.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "where is my refund"}]},
            headers={"authorization": "Bearer rp-client-key"},
        )
    # What the server threads logged (the test's own client logs its URLs in the main thread).
    logs = "\n".join(
        f"{r.name} {r.getMessage()}" for r in caplog.records if r.threadName != "MainThread"
    )
    assert '"POST /v1/chat/completions" 200' in logs
    assert "refused railproxy's API key" in logs
    for secret in ("QUERY-CANARY", "PROMPT-CANARY", "rp-client-key", UPSTREAM_KEY, REFUND_PROMPT):
        assert secret not in logs


def test_demo_upstream_quotes_the_approved_prompt(guards: dict[str, Guard]) -> None:
    with running_proxy(guards["message"], None) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0)
        messages: list[dict[str, str]] = [{"role": "user", "content": "where is my refund"}]
        completion = client.chat.completions.create(model="x", messages=messages)  # type: ignore[arg-type]
        stream = client.chat.completions.create(model="x", messages=messages, stream=True)  # type: ignore[arg-type]
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)  # type: ignore[union-attr]
    text = completion.choices[0].message.content or ""
    assert text.startswith(BANNER) and REFUND_PROMPT in text
    assert streamed == text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


GREETING = "Hi! I can help with ACME billing questions."
NEW_GREETING = "Hello again! I help with ACME billing questions."


def greeting(http: httpx.Client) -> str:
    response = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello there"}]}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def change_greeting(root: Path, embedder: Embedder) -> None:
    billing = root / "billing.yaml"
    billing.write_text(billing.read_text().replace(GREETING, NEW_GREETING))
    build_index(load_rails(root), embedder)


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"


def dripping_is_cut_off(port: int, *, after: float, first: bytes = b"", then: bytes) -> bool:
    """A client dripping bytes (slowloris) is disconnected about `after` s in.

    `first` is a request the server answers at once (here: 401, no key) without
    reading its body; `then` is sent next, before the drip.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=after + 5) as sock:
        if first:
            sock.sendall(first)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(4096)
            assert head.startswith(b"HTTP/1.1 401"), head
        started = time.monotonic()
        sock.sendall(then)
        try:
            while time.monotonic() - started < after + 5:
                sock.sendall(b"x")  # one byte at a time: each resets uvicorn's own timer
                time.sleep(0.2)
        except OSError:  # the server closed the connection
            pass
        else:
            return False
        elapsed = time.monotonic() - started
    return after <= elapsed < after + 2


@pytest.mark.slow
def test_serve_command_answers_reloads_on_sighup_and_drains_on_sigterm(
    tmp_path: Path, embedder: Embedder
) -> None:
    """The real CLI in a subprocess: ready, answers, reloads on SIGHUP (polling off),
    exits 0 on SIGTERM, keys never logged."""
    root = write_proxy_rails(tmp_path / "rails", embedder)
    port = free_port()
    env = {
        **os.environ,
        "RAILPROXY_API_KEYS": "rp-serve-key",
        "OPENAI_API_KEY": "sk-serve-upstream-key",
        "RAILPROXY_RELOAD": "false",
        "RAILPROXY_TIMEOUT_CLIENT_HEADER": "1",
    }
    command = [
        sys.executable,
        "-m",
        "railproxy",
        "serve",
        str(root),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.2)
        assert dripping_is_cut_off(port, after=1, then=HEAD)  # headers, slowly
        early = HEAD + b"content-length: 5\r\n\r\n"  # answered 401 before its body
        assert dripping_is_cut_off(port, after=1, first=early, then=b"12345" + HEAD)
        big = HEAD + b"content-length: 100000\r\n\r\n"  # then the body, slowly
        assert dripping_is_cut_off(port, after=1, first=big, then=b"")
        client = openai.OpenAI(base_url=url + "/v1", api_key="rp-serve-key", max_retries=0)
        with httpx.Client(base_url=url, headers={"authorization": "Bearer rp-serve-key"}) as http:
            completion = client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": "where is my refund"}]
            )
            assert REFUND_PROMPT in (completion.choices[0].message.content or "")
            assert greeting(http) == GREETING
            change_greeting(root, embedder)
            time.sleep(1.5)  # longer than the poll interval: with reload off, nothing may swap
            assert greeting(http) == GREETING
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while greeting(http) == GREETING and time.monotonic() < deadline:
                time.sleep(0.1)
            assert greeting(http) == NEW_GREETING
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0
    assert "DEMO UPSTREAM ACTIVE" in output
    assert '"POST /v1/chat/completions" 200' in output
    assert "rp-serve-key" not in output and "sk-serve-upstream-key" not in output


def test_audit_log_has_one_record_per_request_without_prompts(
    guards: dict[str, Guard], upstream_url: str, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Every chat request gets exactly one record, however it ended: decided, streamed,
    rejected before the guard (400, 415, 404, 405) or refused for its key (401)."""
    audit = tmp_path / "audit.jsonl"
    guard = guards["message"]
    key = {"authorization": "Bearer rp-audit-key"}
    json_headers = {**key, "content-type": "application/json"}

    def chat(text: str, **fields: object) -> bytes:
        return json.dumps({"messages": [{"role": "user", "content": text}], **fields}).encode()

    requests: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("POST", "/v1/chat/completions", chat("where is my refund AUDIT-CANARY"), json_headers),
        (
            "POST",
            "/v1/chat/completions",
            chat("has my refund been processed", stream=True),
            json_headers,
        ),
        (
            "POST",
            "/v1/chat/completions",
            chat("what medicine should I take for a headache"),
            json_headers,
        ),
        ("POST", "/v1/chat/completions", b'{"messages": [', json_headers),
        (
            "POST",
            "/v1/chat/completions",
            chat("AUDIT-CANARY"),
            {**key, "content-type": "text/plain"},
        ),
        ("POST", "/v1/chat%2Fcompletions", chat("where is my refund"), json_headers),
        ("GET", "/v1/chat/completions", b"", key),
        (
            "POST",
            "/v1/chat/completions",
            chat("where is my refund"),
            {"content-type": "application/json"},
        ),
    ]
    answers = []
    with running_proxy(
        guard, upstream_url, client_keys=("rp-audit-key",), server={"audit_log": str(audit)}
    ) as proxy:
        with httpx.Client(base_url=proxy.url) as http:
            for method, path, body, headers in requests:
                answers.append(http.request(method, path, content=body, headers=headers))
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["request_id"] for r in records] == [a.headers["x-request-id"] for a in answers]
    assert [(r["decision"], r["intent"], r["status"], r["outcome"]) for r in records] == [
        ("prompt", "refund_status", 200, "completed"),
        ("prompt", "refund_status", 200, "completed"),
        ("refuse", "medical_advice", 200, "answered"),
        ("invalid", None, 400, "answered"),
        ("invalid", None, 415, "rejected"),
        ("not_found", None, 404, "rejected"),
        ("invalid", None, 405, "rejected"),
        ("unauthorized", None, 401, "rejected"),
    ]
    assert [a.status_code for a in answers] == [r["status"] for r in records]
    approved, streamed = records[0], records[1]
    assert streamed["stream"] is True and approved["stream"] is False
    for record in (approved, streamed, records[2]):
        assert record["digest"] == guard.rails.digest
        assert record["guard_ms"] > 0 and record["total_ms"] >= record["guard_ms"]
        assert record["key"].startswith("key_")
    assert approved["upstream_ms"] > 0
    assert records[-1]["key"] is None
    text = audit.read_text()
    assert "AUDIT-CANARY" not in text and "rp-audit-key" not in text


def test_a_reindex_is_picked_up_while_serving_under_traffic(
    tmp_path: Path, embedder: Embedder, upstream_url: str, upstream: FakeUpstream
) -> None:
    """Clients keep getting answers while the index is replaced; each client's answers
    switch from the old rails to the new ones exactly once (one snapshot per request)."""
    root = write_proxy_rails(tmp_path / "rails", embedder)
    guard = Guard(root, embedder)
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(4)]
    failures: list[str] = []

    def client(answers: list[str]) -> None:
        with httpx.Client(base_url=proxy.url, timeout=10) as http:
            while not stop.is_set():
                try:
                    answers.append(greeting(http))
                    refund = http.post(
                        "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "where is my refund"}]},
                    )
                    if refund.status_code != 200 or refund.headers["x-railproxy-decision"] != (
                        "prompt"
                    ):
                        failures.append(f"refund: {refund.status_code} {refund.text}")
                except (httpx.HTTPError, AssertionError) as exc:
                    failures.append(repr(exc))

    with running_proxy(guard, upstream_url, server={"reload": True}) as proxy:
        threads = [threading.Thread(target=client, args=(answers,)) for answers in seen]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1)
            change_greeting(root, embedder)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(
                answers and answers[-1] == NEW_GREETING for answers in seen
            ):
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=15)
    assert failures == []
    for answers in seen:
        assert set(answers) == {GREETING, NEW_GREETING}
        switch = answers.index(NEW_GREETING)
        assert answers[:switch] == [GREETING] * switch
        assert answers[switch:] == [NEW_GREETING] * (len(answers) - switch)
    approved = [r.json()["messages"] for r in upstream.requests]
    assert approved and all(m == [{"role": "user", "content": REFUND_PROMPT}] for m in approved)


def _no_index(root: Path) -> None:
    shutil.rmtree(index_dir(root))


def _stale(root: Path) -> None:
    (root / "extra.yaml").write_text(
        "intents:\n  - name: extra\n    examples: [a new example]\n    reply: New.\n"
    )


def _corrupt(root: Path) -> None:
    next(index_dir(root).glob("vectors-*.faiss")).write_bytes(b"garbage")


@pytest.mark.parametrize(
    ("damage", "says"),
    [(_no_index, "no index"), (_stale, "changed since"), (_corrupt, "does not match its manifest")],
    ids=["missing", "stale", "corrupt"],
)
def test_serve_refuses_to_start_without_a_sound_index(
    make_rails: RailsFactory, damage: Callable[[Path], None], says: str
) -> None:
    """Never serve unguarded: the CLI exits 1 and says how to fix it, before listening."""
    root = make_rails()
    damage(root)
    result = CliRunner().invoke(cli, ["serve", str(root), "--port", str(free_port())])
    assert result.exit_code == 1
    assert says in result.output.lower()
    assert f"railproxy reindex {root}" in result.output
