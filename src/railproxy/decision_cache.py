"""A small LRU cache of decisions for repeated identical prompts.

Keyed by (normalised text, rails digest). The normalised text is exactly what
the guard embeds and what a pass_user_text rail substitutes, so two prompts
that share a key get the same decision, user text included. The digest is the
one the decision was made under: after a reload the current digest differs, so
a stale entry can never answer. Only short texts are cached (`max_chars`): they
are the ones that repeat, their key is cheap to compute on the event loop, and
memory stays bounded at `maxsize` entries.

Entries are copied in and out, so a caller that mutates a decision's messages
or scores cannot change what the next caller gets.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

from railproxy.decide import Decision
from railproxy.normalize import normalize


class DecisionCache:
    """Thread-safe LRU of Decision by (normalised text, rails digest)."""

    def __init__(self, maxsize: int = 1024, *, max_chars: int = 1000) -> None:
        self.maxsize = maxsize
        self.max_chars = max_chars
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], Decision] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, text: str, *, max_input_chars: int | None = None) -> str | None:
        """The cache key of a raw user text, or None if it is not cached.

        Texts longer than `max_chars` (or than the guard's `max_input_chars`, which
        must still answer input_too_long) are not cached, nor are texts that
        normalise to nothing (the guard rejects those).
        """
        limit = self.max_chars if max_input_chars is None else min(self.max_chars, max_input_chars)
        if self.maxsize <= 0 or len(text) > limit:
            return None
        return normalize(text) or None

    def get(self, key: str, digest: str) -> Decision | None:
        with self._lock:
            decision = self._entries.get((key, digest))
            if decision is None:
                self.misses += 1
                return None
            self._entries.move_to_end((key, digest))
            self.hits += 1
        return _copy(decision)

    def put(self, key: str, decision: Decision) -> None:
        """Remember `decision` for `key` under the digest it was decided with."""
        if self.maxsize <= 0:
            return
        entry = (key, decision.digest)
        stored = _copy(decision)
        with self._lock:
            self._entries[entry] = stored
            self._entries.move_to_end(entry)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _copy(decision: Decision) -> Decision:
    """A copy whose mutable parts (message dicts, scores) are the caller's own."""
    return dataclasses.replace(
        decision,
        upstream_messages=tuple(dict(m) for m in decision.upstream_messages),
        scores=dict(decision.scores),
    )
