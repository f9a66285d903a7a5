"""Micro-batching: concurrent checks share model calls and still fail closed, one by one."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import anyio
import anyio.to_thread
import numpy as np
import pytest

from railproxy.batcher import MicroBatcher, check_batch
from railproxy.decide import Decision
from railproxy.embed import Embedder, Vectors
from railproxy.errors import GuardUnavailable, InputError
from railproxy.guard import Guard
from tests.conftest import RailsFactory


class Gate:
    """A `process` for the batcher that records batches and holds each until let through."""

    def __init__(self, *, open_: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.permits = threading.Semaphore(1000 if open_ else 0)
        self.started = [threading.Event() for _ in range(16)]

    def __call__(self, items: list[str]) -> list[str | BaseException]:
        self.batches.append(list(items))
        self.started[len(self.batches) - 1].set()
        self.permits.acquire(timeout=10)
        return [ValueError(i) if i.startswith("bad") else i.upper() for i in items]

    def let_through(self, batches: int = 1000) -> None:
        self.permits.release(batches)

    async def running(self, count: int) -> None:
        """Wait until the worker has started `count` batches."""
        assert await anyio.to_thread.run_sync(self.started[count - 1].wait, 10)


def test_requests_queued_during_a_batch_form_the_next_one() -> None:
    gate = Gate()
    batcher: MicroBatcher[str, str] = MicroBatcher(gate, max_batch=4)
    results: dict[str, str] = {}

    async def one(item: str) -> None:
        results[item] = await batcher.submit(item)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "first")
            await gate.running(1)  # the worker is busy with ["first"]
            for i in range(10):
                tg.start_soon(one, f"q{i}")
            await anyio.sleep(0.05)  # let every submit reach the queue
            gate.let_through()

    anyio.run(main)
    assert [len(b) for b in gate.batches] == [1, 4, 4, 2]
    assert results == {item: item.upper() for item in ["first", *(f"q{i}" for i in range(10))]}
    assert (batcher.batches, batcher.items) == (4, 11)


def test_each_request_gets_its_own_outcome() -> None:
    batcher: MicroBatcher[str, str] = MicroBatcher(Gate(open_=True))

    async def main() -> list[str | BaseException]:
        outcomes: list[str | BaseException] = []

        async def one(item: str) -> None:
            try:
                outcomes.append(await batcher.submit(item))
            except ValueError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            for item in ["a", "bad1", "b"]:
                tg.start_soon(one, item)
        return outcomes

    outcomes = anyio.run(main)
    assert sorted(o for o in outcomes if isinstance(o, str)) == ["A", "B"]
    assert [str(o) for o in outcomes if isinstance(o, ValueError)] == ["bad1"]


def test_cancelled_requests_leave_their_batch_alone() -> None:
    gate = Gate()
    batcher: MicroBatcher[str, str] = MicroBatcher(gate)
    got: dict[str, str] = {}
    scopes: dict[str, anyio.CancelScope] = {}

    async def one(item: str) -> None:
        with scopes[item]:
            got[item] = await batcher.submit(item)

    async def main() -> None:
        scopes.update({item: anyio.CancelScope() for item in ["first", "a", "b", "c"]})
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "first")
            await gate.running(1)
            for item in "abc":
                tg.start_soon(one, item)
            await anyio.sleep(0.05)
            scopes["c"].cancel()  # cancelled while queued: never reaches the model
            await anyio.sleep(0.01)
            gate.let_through(1)
            await gate.running(2)
            scopes["b"].cancel()  # cancelled while its batch runs
            await anyio.sleep(0.01)
            gate.let_through()

    anyio.run(main)
    assert gate.batches == [["first"], ["a", "b"]]
    assert got == {"first": "FIRST", "a": "A"}  # "a" shared a batch with "b": unaffected
    assert scopes["b"].cancelled_caught and scopes["c"].cancelled_caught


def test_a_request_times_out_while_the_model_hangs() -> None:
    gate = Gate()
    batcher: MicroBatcher[str, str] = MicroBatcher(gate)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.05):
                await batcher.submit("hangs")

    anyio.run(main)
    gate.let_through()
    assert gate.batches == [["hangs"]]


def test_a_process_that_breaks_its_promise_fails_the_batch() -> None:
    def short(items: list[str]) -> list[str | BaseException]:
        return list[str | BaseException](items[:-1])

    batcher: MicroBatcher[str, str] = MicroBatcher(short)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            await batcher.submit("x")

    anyio.run(main)


def test_the_worker_thread_leaves_when_idle_and_comes_back() -> None:
    batcher: MicroBatcher[str, str] = MicroBatcher(Gate(open_=True), idle_exit=0.01)

    async def submit(item: str) -> str:
        return await batcher.submit(item)

    assert anyio.run(submit, "a") == "A"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        t.name == "railproxy-batcher" and t.is_alive() for t in threading.enumerate()
    ):
        time.sleep(0.01)
    assert not any(t.name == "railproxy-batcher" for t in threading.enumerate())
    assert anyio.run(submit, "b") == "B"  # a new loop and a new worker


# --- through the guard, with the real model ---


class FailingEmbedder:
    """The real model's shape, but every embedding call fails (a model fault)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name, self.dimension, self.max_tokens = inner.name, inner.dimension, inner.max_tokens
        self.calls = 0

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls += 1
        raise RuntimeError("model exploded")


TEXTS = [
    "where is my refund",
    "has my money come back yet",
    "hello",
    "what pills help with a migraine",
    "translate good night into french",
    "tell me a joke about cats",
]


async def check_all(guard: Guard, texts: Sequence[str]) -> list[Decision | BaseException]:
    outcomes: list[Decision | BaseException] = [RuntimeError("unset")] * len(texts)

    async def one(i: int) -> None:
        try:
            outcomes[i] = await guard.acheck(texts[i])
        except Exception as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(texts)):
            tg.start_soon(one, i)
    return outcomes


def test_concurrent_checks_match_sync_checks(make_rails: RailsFactory, embedder: Embedder) -> None:
    guard = Guard(make_rails(), embedder)
    texts = [f"{text} {n}" for n in range(5) for text in TEXTS]  # distinct: no cache hits
    outcomes = anyio.run(check_all, guard, texts)
    assert guard.batcher.items == len(texts)
    assert guard.batcher.batches < len(texts)  # some were embedded together
    for text, outcome in zip(texts, outcomes, strict=True):
        assert isinstance(outcome, Decision)
        alone = guard.check(text)
        assert (outcome.action, outcome.intent) == (alone.action, alone.intent)
        assert outcome.score == pytest.approx(alone.score, abs=1e-5)
        assert outcome.upstream_messages == alone.upstream_messages


def test_a_model_fault_fails_every_request_in_the_batch(
    make_rails: RailsFactory, embedder: Embedder
) -> None:
    failing = FailingEmbedder(embedder)
    guard = Guard(make_rails(), failing)
    outcomes = anyio.run(check_all, guard, TEXTS)
    assert all(isinstance(o, GuardUnavailable) for o in outcomes)
    assert len({id(o) for o in outcomes}) == len(TEXTS)  # one exception object each
    assert failing.calls == guard.batcher.batches  # one model call per batch


def test_an_unusable_text_fails_alone(make_rails: RailsFactory, embedder: Embedder) -> None:
    guard = Guard(make_rails(), embedder)
    too_long = "refund " * 400
    outcomes = check_batch(guard, ["where is my refund", "\u200b\u200c", too_long, "hello"])
    assert isinstance(outcomes[0], Decision) and outcomes[0].intent == "refund_status"
    assert isinstance(outcomes[1], InputError) and outcomes[1].code == "invalid_input"
    assert isinstance(outcomes[2], InputError) and outcomes[2].code == "input_too_long"
    assert isinstance(outcomes[3], Decision) and outcomes[3].intent == "greeting"


def test_nan_vectors_fail_closed_in_a_batch(make_rails: RailsFactory, embedder: Embedder) -> None:
    class NanEmbedder(FailingEmbedder):
        def embed(self, texts: Sequence[str]) -> Vectors:
            vectors = self.inner.embed(texts)
            vectors[:] = np.nan
            return vectors

    guard = Guard(make_rails(), NanEmbedder(embedder))
    outcomes = check_batch(guard, TEXTS[:3])
    assert all(isinstance(o, GuardUnavailable) for o in outcomes)


def test_sync_check_does_not_use_the_batcher(make_rails: RailsFactory, embedder: Embedder) -> None:
    guard = Guard(make_rails(), embedder)
    assert guard.check("where is my refund").intent == "refund_status"
    assert guard.check_many(TEXTS[:2])[0].intent == "refund_status"
    assert guard.batcher.batches == 0


def test_under_trio_each_check_runs_alone(make_rails: RailsFactory, embedder: Embedder) -> None:
    guard = Guard(make_rails(), embedder)
    outcomes = anyio.run(check_all, guard, TEXTS[:3], backend="trio")
    assert [o.intent for o in outcomes if isinstance(o, Decision)] == [
        "refund_status",
        "refund_status",
        "greeting",
    ]
    assert guard.batcher.batches == 0  # no shared worker thread outside asyncio
