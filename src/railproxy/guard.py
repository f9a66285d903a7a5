"""The guard: text -> Decision, running normalise, embed, match and decide.

A `Guard` holds one immutable `Snapshot` (rails + index) at a time. `reload()`
builds a new snapshot off to the side and swaps it in with one assignment, so
each check sees exactly one snapshot, and a failed reload leaves the old one
serving. Every failure inside the guard surfaces as `GuardUnavailable` so the
doors can fail closed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread

from railproxy.batcher import MicroBatcher, check_batch
from railproxy.decide import Decision, decide
from railproxy.decision_cache import DecisionCache
from railproxy.embed import Embedder, Vectors, make_embedder
from railproxy.errors import GuardUnavailable, InputError, InputTooLong, RailproxyError
from railproxy.index import IntentIndex, load_index
from railproxy.match import Match, nearest, score_intents
from railproxy.normalize import normalize
from railproxy.rails import RailSet, load_rails

logger = logging.getLogger(__name__)

# (index, query vectors, their neighbours, rails) -> per-intent scores for each query
Scorer = Callable[
    [IntentIndex, Vectors, Sequence[Sequence[Match]], RailSet], Sequence[Mapping[str, float]]
]


@dataclass(frozen=True)
class Snapshot:
    rails: RailSet
    index: IntentIndex


def open_snapshot(root: Path, embedder: Embedder) -> Snapshot:
    """Load rails and their index, refusing a stale, corrupt or mismatched index."""
    rails = load_rails(root)
    index = load_index(root, model=embedder.name)
    if index.dimension != embedder.dimension:
        raise GuardUnavailable(
            f"the index has dimension {index.dimension}, the model {embedder.dimension}"
        )
    if index.digest != rails.digest:  # the rails changed between the two reads
        raise GuardUnavailable(f"{root} changed while loading; try again")
    unknown = set(index.intents) - rails.by_name.keys()
    if unknown:
        raise GuardUnavailable(f"the index names intents the rails lack: {sorted(unknown)[:3]}")
    _ = index.centroids  # computed now, not on the first request
    return Snapshot(rails, index)


class Guard:
    """Decides what happens to a user text. Thread-safe; share one per process."""

    def __init__(
        self, root: Path | str, embedder: Embedder | None = None, *, scorer: Scorer = score_intents
    ) -> None:
        self.root = Path(root)
        self.scorer = scorer  # per-intent scores from neighbours; swappable for benchmarks
        if embedder is None:
            embedder = make_embedder(load_rails(self.root).config.model)
        self.embedder = embedder
        self._snapshot = open_snapshot(self.root, embedder)
        # acheck only: concurrent checks share one model call; repeats skip the model.
        self.batcher: MicroBatcher[str, Decision] = MicroBatcher(
            partial(check_batch, self), max_batch=32
        )
        self.decisions = DecisionCache(maxsize=1024)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def rails(self) -> RailSet:
        return self._snapshot.rails

    def reload(self) -> Snapshot:
        """Swap in the current rails and index. On error the old snapshot keeps serving."""
        snapshot = open_snapshot(self.root, self.embedder)
        self._snapshot = snapshot
        return snapshot

    def prepare(self, text: str, rails: RailSet | None = None) -> str:
        """Normalise and size-check one text (under `rails`, default the current ones).

        Raises InputError/InputTooLong (HTTP 400).
        """
        limit = (rails or self.rails).config.server.max_input_chars
        if len(text) > limit:
            raise InputTooLong(f"the message is {len(text)} characters; the limit is {limit}")
        cleaned = normalize(text)
        if not cleaned:
            raise InputError("the message has no text to check")
        tokens = self.embedder.count_tokens(cleaned)
        if tokens > self.embedder.max_tokens:
            # Never truncate silently: the unread tail could carry anything.
            raise InputTooLong(
                f"the message is {tokens} tokens; the model reads at most "
                f"{self.embedder.max_tokens}"
            )
        return cleaned

    def check(self, text: str) -> Decision:
        """The decision for one user text."""
        return self.check_many([text])[0]

    def check_many(self, texts: Sequence[str]) -> list[Decision]:
        """Decisions for many texts, embedded in one batch. Raises on the first bad text."""
        snapshot = self._snapshot  # one snapshot for the whole call
        cleaned = [self.prepare(text, snapshot.rails) for text in texts]
        try:
            vectors = self.embedder.embed(cleaned)
            rows = nearest(snapshot.index, vectors)
            all_scores = self.scorer(snapshot.index, vectors, rows, snapshot.rails)
        except RailproxyError:
            raise
        except Exception as exc:  # the model or FAISS failed: fail closed
            logger.exception("guard failure")
            raise GuardUnavailable(f"the guard failed: {type(exc).__name__}") from exc
        decisions = []
        for text, matches, scores in zip(cleaned, rows, all_scores, strict=True):
            decisions.append(decide(snapshot.rails, scores, matches, user_text=text))
        return decisions

    async def acheck(self, text: str, *, within: float | None = None) -> Decision:
        """`check` off the event loop, within the rails' guard timeout or `within`
        seconds, whichever is shorter (fail closed: GuardUnavailable).

        Concurrent calls are embedded together in one model call (`batcher`); a
        repeated text under the same rails is answered from `decisions`.
        """
        server = self.rails.config.server
        key = self.decisions.key(text, max_input_chars=server.max_input_chars)
        if key is not None:
            cached = self.decisions.get(key, self._snapshot.rails.digest)
            if cached is not None:
                return cached
        limit = server.timeouts.guard if within is None else min(within, server.timeouts.guard)
        try:
            with anyio.fail_after(limit):
                decision = await self.batcher.submit(text)
        except TimeoutError as exc:
            raise GuardUnavailable(f"the guard did not answer within {limit} s") from exc
        if key is not None:
            self.decisions.put(key, decision)
        return decision

    def warm_up(self) -> None:
        """Run one embedding so the first request does not pay for lazy initialisation."""
        self.embedder.embed(["warm up"])
