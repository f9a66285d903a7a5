"""Rails tests: the `tests:` of every intent, plus JSONL files beside the rails.

Three kinds of case, each checked against the real guard decision:

- `match` (an intent's `tests.match`): the guard must pick that intent (for a
  refuse intent, any refusal will do: the user is refused either way);
- `no_match` (an intent's `tests.no_match`): the guard must not pick that intent;
- `data` (a line of `RAILS_DIR/*.jsonl`, `{"text": ..., "intent": NAME or null}`):
  NAME must be picked; null means the text must not be approved.

A text the guard rejects as input (empty, too long) counts as a no-match, as in
`evaluate.decide_all`: the proxy never approves it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from railproxy.decide import Decision
from railproxy.errors import RailproxyError
from railproxy.evaluate import decide_all, read_examples
from railproxy.guard import Guard
from railproxy.positions import locate
from railproxy.rails import RailSet, Source

CaseKind = Literal["match", "no_match", "data"]


@dataclass(frozen=True, slots=True)
class Case:
    text: str
    kind: CaseKind
    intent: str | None  # match/data: the intent to get (data: None = not approved);
    # no_match: the intent not to get
    source: Source
    refusal: bool = False  # a refuse intent's match case: any refusal passes

    @property
    def expectation(self) -> str:
        if self.kind == "no_match":
            return f"not {self.intent}"
        return self.intent if self.intent is not None else "not approved"


@dataclass(frozen=True, slots=True)
class Outcome:
    case: Case
    decision: Decision
    threshold: float | None  # the threshold of the case's intent

    @property
    def got(self) -> str:
        """The intent chosen, or `no_match`."""
        return self.decision.intent or "no_match"

    @property
    def passed(self) -> bool:
        case, decision = self.case, self.decision
        if case.kind == "no_match":
            return decision.intent != case.intent
        if case.intent is None:
            return not decision.approved
        if case.refusal and decision.action == "refuse":
            return True  # refused by another refusal intent: the user gets a refusal all the same
        return decision.intent == case.intent

    def explain(self) -> str:
        """Why a case failed, with the numbers that decided it."""
        decision, wanted = self.decision, self.case.intent
        if self.passed:
            return ""
        if self.case.kind == "no_match" or wanted is None:
            return (
                f"got {self.got} ({decision.action}) at {decision.score:.3f} "
                f">= threshold {decision.threshold:.3f}"
            )
        own = decision.scores.get(wanted)
        own_text = "not scored" if own is None else f"scored {own:.3f}"
        if self.threshold is not None:
            own_text += f" (threshold {self.threshold:.3f})"
        if decision.intent is None:
            return f"got no_match: {wanted} {own_text}"
        return f"got {decision.intent} at {decision.score:.3f}; {wanted} {own_text}"


@dataclass(frozen=True)
class TestReport:
    outcomes: tuple[Outcome, ...]

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.passed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, object]:
        return {
            "passed": len(self.outcomes) - len(self.failures),
            "failed": len(self.failures),
            "cases": [
                {
                    "file": str(o.case.source.path),
                    "line": o.case.source.line,
                    "kind": o.case.kind,
                    "text": o.case.text,
                    "expected": o.case.expectation,
                    "got": o.got,
                    "action": o.decision.action,
                    "score": round(o.decision.score, 6),
                    "threshold": o.decision.threshold,
                    "passed": o.passed,
                    "reason": o.explain() or None,
                }
                for o in self.outcomes
            ],
        }

    def junit_xml(self) -> bytes:
        """JUnit XML: one <testsuite> per file, one <testcase> per case."""
        suites = ET.Element("testsuites", name="railproxy", tests=str(len(self.outcomes)))
        suites.set("failures", str(len(self.failures)))
        by_file: dict[Path, list[Outcome]] = {}
        for outcome in self.outcomes:
            by_file.setdefault(outcome.case.source.path, []).append(outcome)
        for path, outcomes in by_file.items():
            failed = sum(not o.passed for o in outcomes)
            suite = ET.SubElement(
                suites, "testsuite", name=path.name, tests=str(len(outcomes)), failures=str(failed)
            )
            suite.set("errors", "0")
            for o in outcomes:
                case = ET.SubElement(
                    suite,
                    "testcase",
                    classname=f"{path.stem}.{o.case.intent or 'out_of_scope'}",
                    name=f"{o.case.kind}: {o.case.text}",
                    file=str(path),
                    line=str(o.case.source.line),
                )
                if not o.passed:
                    failure = ET.SubElement(case, "failure", message=o.explain())
                    failure.text = f"{o.case.source}: expected {o.case.expectation}, {o.explain()}"
        return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True))


def data_files(root: Path) -> list[Path]:
    """The JSONL test files beside the rails, in a stable order."""
    return sorted(p for p in root.glob("*.jsonl") if p.is_file() and not p.name.startswith("."))


def collect(rails: RailSet) -> list[Case]:
    """Every case of the rails directory: intents' tests first, then the JSONL files."""
    layouts = locate(rails)
    cases: list[Case] = []
    for intent in rails.intents:
        layout = layouts.get(intent.name)
        fallback = rails.sources[intent.name]
        for kind, texts in (("match", intent.tests.match), ("no_match", intent.tests.no_match)):
            for position, text in enumerate(texts):
                where = layout.test(kind, position) if layout else fallback
                refusal = kind == "match" and intent.action == "refuse"
                cases.append(
                    Case(
                        text,
                        "match" if kind == "match" else "no_match",
                        intent.name,
                        where,
                        refusal=refusal,
                    )
                )
    for path in data_files(rails.root):
        lines = _content_lines(path)
        for example, line in zip(read_examples(path), lines, strict=True):
            if example.intent is not None and example.intent not in rails.by_name:
                raise RailproxyError(f"{path}:{line}: unknown intent {example.intent!r}")
            cases.append(Case(example.text, "data", example.intent, Source(path, line)))
    return cases


def run(guard: Guard, cases: Sequence[Case] | None = None) -> TestReport:
    """Decide every case (by default: every case of the guard's rails)."""
    if cases is None:
        cases = collect(guard.rails)
    rails = guard.rails
    decisions = decide_all(guard, [case.text for case in cases])
    return TestReport(
        tuple(
            Outcome(case, decision, _threshold(rails, case.intent))
            for case, decision in zip(cases, decisions, strict=True)
        )
    )


def _threshold(rails: RailSet, name: str | None) -> float | None:
    intent = rails.by_name.get(name or "")
    return rails.threshold(intent) if intent is not None else None


def _content_lines(path: Path) -> list[int]:
    """Line numbers of the non-blank lines, which `read_examples` turns into examples."""
    with path.open(encoding="utf-8") as handle:
        return [number for number, line in enumerate(handle, 1) if line.strip()]
