"""Fixtures for the proxy tests: a session fake upstream and real proxies per refusal mode.

Test modules opt in with `pytest_plugins = ["tests.proxy_fixtures"]`; the helpers
themselves live in `tests.proxy_support`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from railproxy.embed import Embedder
from railproxy.guard import Guard
from tests.proxy_support import (
    FakeUpstream,
    Proxy,
    ServerThread,
    running_proxy,
    write_proxy_rails,
)


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    with ServerThread(fake) as thread:
        yield fake, thread.url


@pytest.fixture
def upstream(upstream_server: tuple[FakeUpstream, str]) -> FakeUpstream:
    """The recording fake upstream, emptied and well-behaved for each test."""
    fake, _ = upstream_server
    fake.reset()
    return fake


@pytest.fixture(scope="session")
def upstream_url(upstream_server: tuple[FakeUpstream, str]) -> str:
    return upstream_server[1] + "/v1"


@pytest.fixture(scope="session")
def guards(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> dict[str, Guard]:
    """One guard per refusal mode over PROXY_RAILS, sharing the session's embedder."""
    root = tmp_path_factory.mktemp("proxy-rails")
    return {
        mode: Guard(write_proxy_rails(root / mode, embedder, refusal=mode), embedder)
        for mode in ("message", "error")
    }


@pytest.fixture(scope="session")
def proxies(guards: dict[str, Guard], upstream_url: str) -> Iterator[dict[str, Proxy]]:
    """The real app for each refusal mode, against the fake upstream."""
    with (
        running_proxy(guards["message"], upstream_url) as message,
        running_proxy(guards["error"], upstream_url) as error,
    ):
        yield {"message": message, "error": error}


@pytest.fixture
def proxy(proxies: dict[str, Proxy], upstream: FakeUpstream) -> Proxy:
    """The message-mode proxy, with a fresh upstream."""
    return proxies["message"]
