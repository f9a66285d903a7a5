"""Rails lint: examples and thresholds that will make the guard decide badly.

Each `Finding` names the file and line (the example's own line where there is
one) and says how to fix it. The kinds:

- `misplaced`: leave one example out, and its nearest example belongs to another
  intent (nearest-neighbour geometry, independent of thresholds and scoring rule);
- `conflict`: the same text (after normalisation) or a near copy sits in a prompt
  intent and a refuse intent;
- `duplicate`: near copies within one intent (they add nothing) or between two;
- `few_examples` / `low_diversity`: an intent with too few examples, or whose
  examples are rewordings of one sentence (it will match only that sentence);
- `capture`: sent as a prompt, an intent's own example is decided as another
  intent, whose threshold lets it in (the real guard decision: rule and thresholds).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from railproxy.evaluate import decide_all
from railproxy.guard import Guard
from railproxy.normalize import normalize
from railproxy.positions import locate
from railproxy.rails import Source

Kind = Literal["misplaced", "conflict", "duplicate", "few_examples", "low_diversity", "capture"]
KINDS: tuple[Kind, ...] = (
    "misplaced",
    "conflict",
    "duplicate",
    "few_examples",
    "low_diversity",
    "capture",
)

# all-MiniLM-L6-v2 cosines, measured on the CLINC150 rails (10 crowd-written examples
# per intent) and the hand-written rails/ set. Trivial variants ("can"/"could", an
# added "please", "was"/"got", a contraction) score 0.955-0.999; real paraphrases
# within one intent stay below: rails/ tops out at 0.88 ("I lost my phone" / "I've
# lost my phone, what now"), "cancel my order" / "i want to cancel my order" is 0.92.
NEAR_DUPLICATE = 0.95
# A prompt/refuse pair is worse than a duplicate (one phrasing opens the door, the
# other shuts it), so flag it earlier. Distinct intents rarely get this close: the
# 99.99th percentile of cross-intent pairs is 0.68 on CLINC150, 0.63 on rails/.
CONFLICT = 0.90
# Mean pairwise cosine of an intent's examples: hand-written intents in rails/ run
# 0.19-0.53 (median 0.39), CLINC150's templated ones median 0.55; above 0.70 the
# examples are mostly one sentence reworded (CLINC's card_declined: 0.81).
LOW_DIVERSITY = 0.70
MIN_EXAMPLES = 5  # fewer cannot cover the ways people phrase one request
_BLOCK = 512


@dataclass(frozen=True, slots=True)
class Finding:
    kind: Kind
    intent: str
    source: Source
    message: str
    fix: str

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "intent": self.intent,
            "file": str(self.source.path),
            "line": self.source.line,
            "message": self.message,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class _Example:
    intent: str
    action: str
    text: str
    key: str  # what counts as "the same text"
    source: Source


def lint(guard: Guard) -> list[Finding]:
    """Every finding for the guard's rails and index, sorted by file and line."""
    rails, index = guard.rails, guard.snapshot.index
    layouts = locate(rails)
    seen: dict[str, int] = {}
    examples = []
    for entry in index.entries:
        position = seen[entry.intent] = seen.get(entry.intent, -1) + 1
        layout = layouts.get(entry.intent)
        where = layout.example(position) if layout else rails.sources[entry.intent]
        action = rails.by_name[entry.intent].action
        key = normalize(entry.text).casefold()
        examples.append(_Example(entry.intent, action, entry.text, key, where))
    vectors = index.vectors()
    findings = [
        *_pairs(examples, vectors),
        *_coverage(guard, examples, vectors),
        *_captures(guard, examples),
    ]
    return sorted(findings, key=lambda f: (str(f.source.path), f.source.line, f.kind))


def _pairs(examples: list[_Example], vectors: np.ndarray) -> Iterator[Finding]:
    """misplaced, conflict and duplicate: one pass over the similarity matrix."""
    intents = np.array([e.intent for e in examples])
    by_key: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_key.setdefault(example.key, []).append(i)
    for start in range(0, len(examples), _BLOCK):
        sims = vectors[start : start + _BLOCK] @ vectors.T
        for offset, row in enumerate(sims):
            i = start + offset
            a = examples[i]
            row[i] = -np.inf
            close = set(np.nonzero(row >= CONFLICT)[0].tolist()) | set(by_key[a.key])
            for j in sorted(close):
                if j > i:
                    yield from _pair(a, examples[j], float(row[j]))
            own = np.where(intents == a.intent, row, -np.inf)
            other = np.where(intents != a.intent, row, -np.inf)
            j = int(other.argmax())
            b = examples[j]
            if own.max() == -np.inf or other[j] <= own.max() or _copies(a, b, float(other[j])):
                continue  # a lone example, well placed, or reported as a copy
            if a.action == b.action == "refuse":
                continue  # either refusal answers it: no decision changes
            yield Finding(
                "misplaced",
                a.intent,
                a.source,
                f"example {a.text!r} of {a.intent!r} is closer to {b.intent!r}'s {b.text!r} "
                f"({other[j]:.2f}) than to any other example of its own ({own.max():.2f})",
                f"move it to {b.intent!r}, reword it, or delete it",
            )


def _conflicting(a: _Example, b: _Example) -> bool:
    return {a.action, b.action} == {"prompt", "refuse"}


def _copies(a: _Example, b: _Example, similarity: float) -> bool:
    """Whether `_pair` reports these two examples."""
    limit = CONFLICT if _conflicting(a, b) else NEAR_DUPLICATE
    return a.key == b.key or similarity >= limit


def _pair(a: _Example, b: _Example, similarity: float) -> Iterator[Finding]:
    same = a.key == b.key
    how = "the same text as" if same else f"a near copy ({similarity:.2f}) of"
    if not _copies(a, b, similarity):
        return
    if _conflicting(a, b):
        yield Finding(
            "conflict",
            a.intent,
            a.source,
            f"{a.action} example {a.text!r} of {a.intent!r} is {how} {b.action} example "
            f"{b.text!r} of {b.intent!r} ({b.source})",
            "keep the phrasing in only one of the two intents",
        )
    else:
        where = "the same intent" if a.intent == b.intent else repr(b.intent)
        fix = (
            "delete one, or replace it with a different way of asking"
            if a.intent == b.intent
            else "keep it in only one intent (the guard cannot tell them apart)"
        )
        yield Finding(
            "duplicate",
            b.intent,
            b.source,
            f"example {b.text!r} is {how} {a.text!r} of {where} ({a.source})",
            fix,
        )


def _coverage(guard: Guard, examples: list[_Example], vectors: np.ndarray) -> Iterator[Finding]:
    """few_examples and low_diversity, per intent."""
    rails = guard.rails
    for intent in rails.intents:
        rows = [i for i, e in enumerate(examples) if e.intent == intent.name]
        count, where = len(rows), rails.sources[intent.name]
        if count < MIN_EXAMPLES:
            yield Finding(
                "few_examples",
                intent.name,
                where,
                f"intent {intent.name!r} has {count} example(s); at least {MIN_EXAMPLES} "
                "cover the ways people phrase a request",
                f"add {MIN_EXAMPLES - count} or more differently worded examples",
            )
        if count >= 3:
            total = vectors[rows].sum(axis=0)
            # mean cosine over distinct pairs, from |sum|^2 = n + sum of pair cosines
            mean = (float(total @ total) - count) / (count * (count - 1))
            if mean >= LOW_DIVERSITY:
                yield Finding(
                    "low_diversity",
                    intent.name,
                    where,
                    f"the examples of {intent.name!r} are rewordings of one sentence "
                    f"(mean similarity {mean:.2f} >= {LOW_DIVERSITY})",
                    "replace some with different ways of asking (other words, lengths, details)",
                )


def _captures(guard: Guard, examples: list[_Example]) -> Iterator[Finding]:
    """capture: run every example through the guard and see who takes it."""
    rails = guard.rails
    layouts = locate(rails)
    decisions = decide_all(guard, [e.text for e in examples])
    for example, decision in zip(examples, decisions, strict=True):
        own = decision.scores.get(example.intent, -np.inf)
        takers = [
            (score, name)
            for name, score in decision.scores.items()
            if name != example.intent
            and score > own
            and score >= rails.threshold(rails.by_name[name])
        ]
        if not takers:
            continue
        score, name = max(takers)
        taker = rails.by_name[name]
        layout = layouts.get(name)
        where = layout.threshold_source if layout else rails.sources[name]
        yield Finding(
            "capture",
            name,
            where,
            f"threshold {rails.threshold(taker):.2f} of {name!r} lets it take "
            f"{example.intent!r}'s example {example.text!r} ({example.source}): "
            f"{name} scores {score:.3f}, {example.intent} {own:.3f}",
            f"raise {name!r}'s threshold above {score:.3f} if its own tests still pass, "
            f"or reword the example / merge the two intents",
        )
