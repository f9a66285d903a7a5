"""Score a labelled set against a rails directory.

A line is `{"text": ..., "intent": NAME or null}`; null means the text must not
be approved (refused, replied to, or no match are all fine). A text labelled
with an intent is correct only when the guard picks exactly that intent.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from railproxy.decide import Decision, decide
from railproxy.errors import InputError, RailproxyError
from railproxy.guard import Guard

BATCH = 64


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    intent: str | None


@dataclass
class Report:
    in_scope: int = 0
    correct: int = 0
    out_of_scope: int = 0
    rejected: int = 0  # out-of-scope texts that were not approved
    false_approvals: list[tuple[str, str]] = field(default_factory=list)  # (text, intent)
    confusions: Counter[tuple[str, str]] = field(default_factory=Counter)  # (expected, got)
    sweep: list[dict[str, float]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.in_scope if self.in_scope else float("nan")

    @property
    def oos_recall(self) -> float:
        return self.rejected / self.out_of_scope if self.out_of_scope else float("nan")

    def as_dict(self, top: int = 10) -> dict[str, object]:
        return {
            "in_scope": self.in_scope,
            "accuracy": self.accuracy,
            "out_of_scope": self.out_of_scope,
            "oos_recall": self.oos_recall,
            "false_approvals": len(self.false_approvals),
            "false_approval_examples": [
                {"text": t, "intent": i} for t, i in self.false_approvals[:top]
            ],
            "confusions": [
                {"expected": e, "got": g, "count": n}
                for (e, g), n in self.confusions.most_common(top)
            ],
            "threshold_sweep": self.sweep,
        }


def read_examples(path: Path) -> list[Example]:
    """Read a JSONL file; errors name the line."""
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, intent = row["text"], row.get("intent")
            except (ValueError, KeyError, TypeError) as exc:
                raise RailproxyError(f'{path}:{number}: expected {{"text", "intent"}}') from exc
            if not isinstance(text, str) or not (intent is None or isinstance(intent, str)):
                raise RailproxyError(
                    f"{path}:{number}: text must be a string, intent a string or null"
                )
            examples.append(Example(text, intent))
    return examples


def decide_all(guard: Guard, texts: Sequence[str]) -> list[Decision]:
    """A decision per text. A text the guard rejects as input (too long, empty)
    becomes a no_match without scores: the proxy answers it with a 400, so it is
    never approved."""
    rejected: dict[int, Decision] = {}
    usable: list[str] = []
    for position, text in enumerate(texts):
        try:
            guard.prepare(text)
        except InputError as exc:
            rejected[position] = Decision(
                "no_match", None, -1.0, float("nan"), (), guard.rails.digest, message=str(exc)
            )
        else:
            usable.append(text)
    decided: list[Decision] = []
    for start in range(0, len(usable), BATCH):
        decided.extend(guard.check_many(usable[start : start + BATCH]))
    remaining = iter(decided)
    return [rejected[i] if i in rejected else next(remaining) for i in range(len(texts))]


def evaluate(guard: Guard, examples: Sequence[Example], thresholds: Iterable[float] = ()) -> Report:
    """Score `examples`; `thresholds` adds a sweep with one global threshold each."""
    unknown = {e.intent for e in examples if e.intent is not None} - guard.rails.by_name.keys()
    if unknown:
        raise RailproxyError(f"the data names intents the rails lack: {sorted(unknown)[:5]}")
    decisions = decide_all(guard, [e.text for e in examples])
    report = Report()
    for example, decision in zip(examples, decisions, strict=True):
        if example.intent is None:
            report.out_of_scope += 1
            if decision.approved:
                report.false_approvals.append((example.text, decision.intent or ""))
            else:
                report.rejected += 1
        else:
            report.in_scope += 1
            if decision.intent == example.intent and decision.action != "no_match":
                report.correct += 1
            else:
                report.confusions[(example.intent, decision.intent or "<no match>")] += 1
    report.sweep = [sweep_point(guard, examples, decisions, t) for t in thresholds]
    return report


def sweep_point(
    guard: Guard, examples: Sequence[Example], decisions: Sequence[Decision], t: float
) -> dict[str, float]:
    """Accuracy and out-of-scope recall if every intent's threshold were `t`.

    Re-decides from each decision's scores (decide is pure), so one embedding
    pass serves every threshold.
    """
    rails = guard.rails
    everyone = dict.fromkeys(rails.by_name, t)
    redone = [
        decide(rails, d.scores, d.neighbours, thresholds=everyone) if d.scores else d
        for d in decisions
    ]
    return _point(examples, redone) | {"threshold": round(t, 4)}


def _point(examples: Sequence[Example], decisions: Sequence[Decision]) -> dict[str, float]:
    correct = in_scope = rejected = out = 0
    for example, decision in zip(examples, decisions, strict=True):
        if example.intent is None:
            out += 1
            rejected += 0 if decision.approved else 1
        else:
            in_scope += 1
            correct += decision.intent == example.intent and decision.action != "no_match"
    return {
        "accuracy": correct / in_scope if in_scope else float("nan"),
        "oos_recall": rejected / out if out else float("nan"),
    }


def operating_point(
    guard: Guard,
    examples: Sequence[Example],
    decisions: Sequence[Decision],
    min_recall: float,
    thresholds: Iterable[float],
) -> dict[str, float] | None:
    """The global threshold with the best accuracy whose out-of-scope recall is >= min_recall."""
    best = None
    for t in thresholds:
        point = sweep_point(guard, examples, decisions, t)
        if point["oos_recall"] >= min_recall and (
            best is None or point["accuracy"] > best["accuracy"]
        ):
            best = point
    return best
