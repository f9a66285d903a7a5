"""The guard with the real model: decisions, limits, and failing closed."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import numpy as np
import pytest

from railproxy.embed import Embedder, Vectors
from railproxy.errors import GuardUnavailable, InputError, InputTooLong
from railproxy.guard import Guard
from tests.conftest import RailsFactory


@pytest.mark.parametrize(
    ("text", "action", "intent"),
    [
        pytest.param("has my refund gone through yet?", "prompt", "refund_status", id="approved"),
        pytest.param("which pills help a migraine", "refuse", "medical_advice", id="refused"),
        pytest.param("hello!", "reply", "greeting", id="reply"),
        pytest.param("write me a poem about the sea", "no_match", None, id="no-match"),
        pytest.param("wh\u200bere is my re\u200bfund", "prompt", "refund_status", id="invisible"),
    ],
)
def test_decisions(
    make_rails: RailsFactory, embedder: Embedder, text: str, action: str, intent: str | None
) -> None:
    guard = Guard(make_rails(), embedder)
    decision = guard.check(text)
    assert (decision.action, decision.intent) == (action, intent)
    assert decision.neighbours and -1.0 <= decision.score <= 1.0001
    if action == "prompt":
        assert decision.upstream_messages == (
            {
                "role": "user",
                "content": "Explain how an ACME customer checks the status of a refund "
                "in the web portal.\n",
            },
        )
        assert decision.upstream_model == "gpt-4o-mini"
    else:
        assert decision.upstream_messages == ()


def test_opted_in_rail_carries_normalised_user_text(
    make_rails: RailsFactory, embedder: Embedder
) -> None:
    guard = Guard(make_rails(), embedder)
    decision = guard.check("translate this to french: good\u200b night")
    assert decision.intent == "translate_to_french"
    assert decision.upstream_model == "gpt-4o"
    assert decision.upstream_messages[-1]["content"] == (
        "Translate into French: translate this to french: good night"
    )


def test_too_long_is_rejected_not_truncated(make_rails: RailsFactory, embedder: Embedder) -> None:
    guard = Guard(make_rails(), embedder)
    with pytest.raises(InputTooLong, match="tokens; the model reads at most 256"):
        guard.check("where is my refund " + "please " * 300)
    with pytest.raises(InputTooLong, match="characters"):
        guard.check("x" * 20_000)


def test_invisible_only_text_is_rejected(make_rails: RailsFactory, embedder: Embedder) -> None:
    with pytest.raises(InputError, match="no text"):
        Guard(make_rails(), embedder).check("\u200b\u200c ")


class BrokenEmbedder:
    """A model seam that fails the way real models do."""

    def __init__(self, inner: Embedder, mode: str) -> None:
        self.inner, self.mode = inner, mode
        self.name, self.dimension, self.max_tokens = inner.name, inner.dimension, inner.max_tokens

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embed(self, texts: Sequence[str]) -> Vectors:
        if self.mode == "raise":
            raise RuntimeError("CUDA out of memory")
        if self.mode == "slow":
            time.sleep(0.5)
        vectors = self.inner.embed(texts)
        if self.mode == "nan":
            vectors[:] = np.nan
        return vectors


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_guard_fails_closed(make_rails: RailsFactory, embedder: Embedder, mode: str) -> None:
    guard = Guard(make_rails(), BrokenEmbedder(embedder, mode))
    with pytest.raises(GuardUnavailable):
        guard.check("where is my refund")


def test_async_guard_times_out_closed(make_rails: RailsFactory, embedder: Embedder) -> None:
    root = make_rails()
    (root / "config.yaml").write_text("server:\n  timeouts:\n    guard: 0.1\n")
    from railproxy.index import build_index
    from railproxy.rails import load_rails

    build_index(load_rails(root), embedder)
    guard = Guard(root, BrokenEmbedder(embedder, "slow"))

    async def main() -> None:
        with pytest.raises(GuardUnavailable, match=r"did not answer within 0\.1 s"):
            await guard.acheck("where is my refund")
        # A tighter limit from the caller (the server's override) wins; a looser one not.
        with pytest.raises(GuardUnavailable, match=r"did not answer within 0\.05 s"):
            await guard.acheck("where is my refund", within=0.05)
        with pytest.raises(GuardUnavailable, match=r"did not answer within 0\.1 s"):
            await guard.acheck("where is my refund", within=30)

    anyio.run(main)
    # The first slow batch still runs in the batcher's thread (the later ones were
    # abandoned before they started): let it end, or an exit now aborts inside the model.
    time.sleep(1.0)


def test_reload_swaps_and_failed_reload_keeps_old(
    make_rails: RailsFactory, embedder: Embedder
) -> None:
    root = make_rails()
    guard = Guard(root, embedder)
    old = guard.snapshot
    (root / "billing.yaml").write_text(
        "intents:\n  - name: weather\n    examples: [is it raining]\n    reply: Sunny.\n"
    )
    with pytest.raises(Exception, match="changed since indexing"):
        guard.reload()
    assert guard.snapshot is old
    from railproxy.index import build_index
    from railproxy.rails import load_rails

    build_index(load_rails(root), embedder)
    guard.reload()
    assert guard.check("is it raining outside").intent == "weather"
