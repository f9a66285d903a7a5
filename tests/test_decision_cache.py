"""The decision cache: repeats skip the model; a reload or a different text never hits."""

from __future__ import annotations

import anyio
import pytest

from railproxy.decide import Decision
from railproxy.decision_cache import DecisionCache
from railproxy.embed import Embedder
from railproxy.errors import InputTooLong
from railproxy.guard import Guard
from railproxy.index import build_index
from railproxy.match import Match
from railproxy.rails import load_rails
from tests.conftest import RailsFactory


def decision(intent: str, digest: str = "d1", text: str = "x") -> Decision:
    return Decision(
        "prompt",
        intent,
        0.9,
        0.6,
        (Match(intent, "example", 0.9),),
        digest,
        upstream_messages=({"role": "user", "content": text},),
        upstream_model="gpt-4o-mini",
        scores={intent: 0.9},
    )


def test_least_recently_used_entries_go_first() -> None:
    cache = DecisionCache(maxsize=2)
    cache.put("a", decision("a"))
    cache.put("b", decision("b"))
    assert cache.get("a", "d1") is not None  # "a" is now the most recent
    cache.put("c", decision("c"))
    assert len(cache) == 2
    assert cache.get("b", "d1") is None
    assert [cache.get(k, "d1") is not None for k in "ac"] == [True, True]
    assert (cache.hits, cache.misses) == (3, 1)


def test_entries_answer_only_under_their_digest() -> None:
    cache = DecisionCache()
    cache.put("a", decision("a", digest="old"))
    assert cache.get("a", "new") is None
    got = cache.get("a", "old")
    assert got is not None and got.intent == "a"


def test_callers_cannot_change_what_the_cache_holds() -> None:
    cache = DecisionCache()
    original = decision("a", text="hello")
    cache.put("a", original)
    dict(original.upstream_messages[0])  # sanity: a plain mapping
    mutable = original.upstream_messages[0]
    assert isinstance(mutable, dict)
    mutable["content"] = "changed after put"
    first = cache.get("a", "d1")
    assert first is not None
    assert first.upstream_messages[0]["content"] == "hello"
    first_message = first.upstream_messages[0]
    assert isinstance(first_message, dict)
    first_message["content"] = "changed after get"
    assert isinstance(first.scores, dict)
    first.scores["a"] = -1.0
    second = cache.get("a", "d1")
    assert second is not None
    assert second.upstream_messages[0]["content"] == "hello"
    assert second.scores == {"a": 0.9}


def test_keys_are_the_normalised_text_of_short_texts() -> None:
    cache = DecisionCache(max_chars=40)
    assert cache.key("where\u200b is  my\tREFUND ") == "where is my REFUND"
    assert cache.key("\u200b\u200c ") is None  # the guard rejects it: nothing to cache
    assert cache.key("x" * 41) is None
    assert cache.key("x" * 30, max_input_chars=20) is None  # must still answer too long
    assert DecisionCache(maxsize=0).key("hi") is None


def test_a_repeated_prompt_skips_the_model(make_rails: RailsFactory, embedder: Embedder) -> None:
    guard = Guard(make_rails(), embedder)

    async def main() -> list[Decision]:
        return [
            await guard.acheck("where is my refund"),
            await guard.acheck("where is my refund"),
            await guard.acheck("where\u200b is  my refund"),  # same normalised text
            await guard.acheck("where is my refund?"),  # a different text
        ]

    first, again, variant, other = anyio.run(main)
    assert again == first == variant
    assert guard.batcher.items == 2  # only the first and the different text were embedded
    assert (guard.decisions.hits, guard.decisions.misses) == (2, 2)
    assert other.intent == "refund_status"


def test_pass_user_text_carries_the_normalised_text(
    make_rails: RailsFactory, embedder: Embedder
) -> None:
    guard = Guard(make_rails(), embedder)
    raw = "translate this to french:\u200b  bonne nuit"

    async def twice() -> tuple[Decision, Decision]:
        return await guard.acheck(raw), await guard.acheck("translate this to french: bonne nuit")

    fresh, cached = anyio.run(twice)
    assert guard.decisions.hits == 1
    assert fresh.intent == cached.intent == "translate_to_french"
    assert cached.upstream_messages == guard.check(raw).upstream_messages
    assert "translate this to french: bonne nuit" in cached.upstream_messages[-1]["content"]


def test_a_reload_never_serves_stale_decisions(
    make_rails: RailsFactory, embedder: Embedder
) -> None:
    root = make_rails()
    guard = Guard(root, embedder)
    text = "what medicine should I take for a headache"
    before = anyio.run(guard.acheck, text)
    assert before.action == "refuse"
    billing = (root / "billing.yaml").read_text()
    (root / "billing.yaml").write_text(
        billing.replace("refuse: I can't give medical advice.", "reply: Ask a pharmacist.")
    )
    build_index(load_rails(root), embedder)
    guard.reload()
    after = anyio.run(guard.acheck, text)
    assert (after.action, after.message) == ("reply", "Ask a pharmacist.")
    assert after.digest != before.digest
    assert guard.decisions.hits == 0


def test_input_errors_are_never_cached(make_rails: RailsFactory, embedder: Embedder) -> None:
    guard = Guard(make_rails(), embedder)
    too_long = "refund " * 140  # under max_chars, over the model's 256 tokens

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(InputTooLong):
                await guard.acheck(too_long)

    anyio.run(main)
    assert len(guard.decisions) == 0
    assert guard.batcher.items == 2
