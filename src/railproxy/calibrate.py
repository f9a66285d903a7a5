"""Per-intent thresholds from labelled data, for a target false-approval rate.

The data are `evaluate` lines: `{"text", "intent": NAME or null}`. A text must
not be approved when its label is null or names a refuse/reply intent; the
false-approval rate is the share of those that the guard approves. In-scope
accuracy is the share of texts labelled with an intent that get exactly it.

Why not tune each threshold freely: a per-intent false-approval rate needs
out-of-scope texts near each intent, and labelled sets have few of them (CLINC150
has 100 for 150 intents). Greedy per-intent moves against such data lower every
threshold that no out-of-scope text happens to sit near, and the false approvals
come back on new data (on a 50/50 split of CLINC150's calibration data, a 0.10
target held on one half became 0.25-0.30 on the other). So only what the data
can carry is fitted:

1. shape, from the in-scope texts (plentiful): intent j's offset is
   BETA * n_j / (n_j + PRIOR) * (m_j - mean_k m_k), where m_j is the mean score of
   j's own texts. Tight intents get higher thresholds, diffuse ones lower;
   intents with few texts stay near the global value;
2. one shift, from the must-not-approve texts: the lowest uniform offset whose
   false-approval rate meets the target (one parameter, so the target holds);
3. refinement, FA-safe: each threshold moves only in the direction that cannot
   add a false approval (a prompt intent up, a refuse/reply intent down) when
   that wins in-scope decisions, GAMMA per unit of threshold moved; then step 2
   again spends the false approvals this freed. Twice.

Thresholds are rounded away from approving (prompt up, others down) and the
result is re-checked with the real `decide`. Intents from shipped packs keep their
thresholds (they are not in the rails directory to be edited).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from railproxy.decide import Decision, decide
from railproxy.errors import RailproxyError
from railproxy.evaluate import Example, decide_all
from railproxy.guard import Guard
from railproxy.positions import editable
from railproxy.rails import RailSet

# Chosen on a 50/50 split of CLINC150's calibration data (train 11..100 + oos_train),
# never on val: BETA in 0.4-0.6 was best at every false-approval target (0.05-0.15),
# +1.3 to +2.8 points of accuracy over one global threshold at matched false
# approvals; 0 is the global threshold, 1 (every intent's typical score equalised)
# is worse than 0 (0.781 against 0.813 at 0.05). The mean, 10th, 25th or 50th
# percentile of the own scores made no real difference; the mean is the steadiest.
BETA = 0.5
PRIOR = 10  # own texts at which an intent's offset gets half weight
# A refinement move of 0.05 must win at least one net correct decision.
# 10-30 did best on the split (+0.5 point); 100 is no refinement.
GAMMA = 20.0
STEP, SPAN, ROUNDS, PLACES = 0.005, 0.15, 2, 3

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class Point:
    """In-scope accuracy and false-approval rate of one set of thresholds."""

    correct: int
    in_scope: int
    false_approvals: int
    must_not: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.in_scope if self.in_scope else math.nan

    @property
    def false_approval(self) -> float:
        return self.false_approvals / self.must_not if self.must_not else math.nan


@dataclass(frozen=True)
class Calibration:
    target: float
    current: dict[str, float]  # each intent's threshold before
    global_threshold: float  # the one threshold for every intent that meets the target
    global_thresholds: dict[str, float]  # it, per intent (packs keep theirs)
    thresholds: dict[str, float]  # calibrated, per intent
    own_texts: dict[str, int]  # labelled texts per intent
    before: Point
    global_point: Point
    after: Point

    def changed(self) -> dict[str, tuple[float, float]]:
        return {
            name: (self.current[name], new)
            for name, new in self.thresholds.items()
            if abs(new - self.current[name]) > 1e-9
        }


def calibrate(guard: Guard, examples: Sequence[Example], target: float) -> Calibration:
    """Per-intent thresholds whose false-approval rate on `examples` is <= `target`."""
    _check(guard.rails, examples, target)  # before the slow part
    decisions = decide_all(guard, [e.text for e in examples])
    return calibrate_decisions(guard.rails, examples, decisions, target)


def calibrate_decisions(
    rails: RailSet, examples: Sequence[Example], decisions: Sequence[Decision], target: float
) -> Calibration:
    """`calibrate` on decisions already made (decide is pure: one embedding pass
    serves any number of targets)."""
    _check(rails, examples, target)
    problem = _Problem(rails, examples, decisions)
    flat = np.zeros(len(problem.names))
    global_values = _round(problem, problem.meet(flat, target))
    global_thresholds, global_point = _verify(problem, examples, decisions, global_values, target)
    own = [name for name, fixed in zip(problem.names, problem.fixed, strict=True) if not fixed]
    values = problem.meet(problem.shape(), target)
    for _ in range(ROUNDS):
        values = problem.meet(problem.refine(values), target)
    thresholds, after = _verify(problem, examples, decisions, _round(problem, values), target)
    current = {i.name: rails.threshold(i) for i in rails.intents}
    return Calibration(
        target=target,
        current=current,
        global_threshold=max((global_thresholds[name] for name in own), default=math.nan),
        global_thresholds=global_thresholds,
        thresholds=thresholds,
        own_texts={name: int((problem.labels == k).sum()) for k, name in enumerate(problem.names)},
        before=point(rails, examples, decisions, current),
        global_point=global_point,
        after=after,
    )


def point(
    rails: RailSet,
    examples: Sequence[Example],
    decisions: Sequence[Decision],
    thresholds: Mapping[str, float],
) -> Point:
    """Re-decide every text with `thresholds` (decide is pure) and count."""
    correct = in_scope = false = must_not = 0
    for example, decision in zip(examples, decisions, strict=True):
        if decision.scores:
            decision = decide(rails, decision.scores, (), thresholds=thresholds)
        intent = rails.by_name.get(example.intent or "")
        if intent is not None:
            in_scope += 1
            correct += decision.intent == intent.name
        if intent is None or intent.action != "prompt":
            must_not += 1
            false += decision.approved
    return Point(correct, in_scope, false, must_not)


class _Problem:
    """The decisions as a score matrix, and the three steps of the algorithm on it.

    `winners` emulates `decide` (best candidate at or above its threshold); the
    final thresholds are checked with `decide` itself."""

    def __init__(
        self, rails: RailSet, examples: Sequence[Example], decisions: Sequence[Decision]
    ) -> None:
        self.rails = rails
        self.names = [intent.name for intent in rails.intents]
        column = {name: k for k, name in enumerate(self.names)}
        self.prompt = np.array([i.action == "prompt" for i in rails.intents])
        self.scores = np.full((len(examples), len(self.names)), -np.inf)
        for row, decision in enumerate(decisions):
            for name, score in decision.scores.items():
                self.scores[row, column[name]] = score
        self.current = np.array([rails.threshold(i) for i in rails.intents])
        self.fixed = np.array([not editable(rails, name) for name in self.names])  # packs
        self.labels = np.array([column.get(e.intent or "", -1) for e in examples], dtype=np.int64)
        labelled = self.labels >= 0
        self.must_not = ~labelled | ~self.prompt[np.maximum(self.labels, 0)]

    def winners(self, thresholds: Matrix, rows: Matrix | None = None) -> npt.NDArray[np.int64]:
        scores = self.scores if rows is None else rows
        masked = np.where(scores >= thresholds[None, :], scores, -np.inf)
        best = masked.argmax(axis=1)
        return np.where(np.isfinite(masked.max(axis=1)), best, -1)

    def false_approvals(self, thresholds: Matrix) -> int:
        won = self.winners(thresholds)
        return int((self.must_not & (won >= 0) & self.prompt[np.maximum(won, 0)]).sum())

    def budget(self, target: float) -> int:
        return math.floor(target * int(self.must_not.sum()) + 1e-9)

    def pin(self, values: Matrix) -> Matrix:
        """`values` with the thresholds of pack intents (not editable) left as they are."""
        return np.where(self.fixed, self.current, values)

    def meet(self, shape: Matrix, target: float) -> Matrix:
        """`shape` plus the lowest uniform offset that meets the target (bisection)."""
        budget = self.budget(target)
        low, high = -2.0 - float(shape.max()), 2.0 - float(shape.min())
        for _ in range(40):
            middle = (low + high) / 2
            if self.false_approvals(self.pin(shape + middle)) <= budget:
                high = middle
            else:
                low = middle
        return self.pin(shape + high)

    def shape(self) -> Matrix:
        """BETA-shrunk offsets from each intent's mean own score (step 1)."""
        means = np.zeros(len(self.names))
        counts = np.zeros(len(self.names))
        for k in range(len(self.names)):
            own = self.scores[self.labels == k, k]
            own = own[np.isfinite(own)]
            counts[k] = len(own)
            means[k] = own.mean() if len(own) else 0.0
        if not counts.any():
            return np.zeros(len(self.names))
        centre = means[counts > 0].mean()
        return np.where(counts > 0, BETA * counts / (counts + PRIOR) * (means - centre), 0.0)

    def refine(self, thresholds: Matrix) -> Matrix:
        """One FA-safe coordinate pass (step 3); returns the new thresholds."""
        values = thresholds.copy()
        for j in np.nonzero(~self.fixed)[0].tolist():
            direction = 1.0 if self.prompt[j] else -1.0
            grid = values[j] + direction * np.arange(0.0, SPAN + 1e-9, STEP)
            rows = np.nonzero(self.scores[:, j] >= grid.min())[0]
            if not len(rows):
                continue
            block = self.scores[rows]
            others = values.copy()
            others[j] = np.inf  # the best candidate if j is not one
            other = self.winners(others, block)
            other_score = np.where(other >= 0, block[np.arange(len(rows)), other], -np.inf)
            own = block[:, j]
            beats = own > other_score
            labels = self.labels[rows][beats]
            delta = (labels == j).astype(float) - ((labels == other[beats]) & (labels >= 0))
            order = np.argsort(-own[beats])
            ranked, gains = own[beats][order], np.cumsum(delta[order])
            reached = np.searchsorted(-ranked, -grid, side="right")  # rows with own >= grid
            gain = np.where(reached > 0, gains[np.maximum(reached - 1, 0)], 0.0)
            values[j] = grid[int(np.argmax(gain - GAMMA * np.abs(grid - values[j])))]
        return values


def _check(rails: RailSet, examples: Sequence[Example], target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise RailproxyError(f"the target false-approval rate must be in [0, 1), not {target}")
    unknown = {e.intent for e in examples if e.intent is not None} - rails.by_name.keys()
    if unknown:
        raise RailproxyError(f"the data names intents the rails lack: {sorted(unknown)[:5]}")
    allowed = {i.name for i in rails.intents if i.action != "prompt"}
    if not any(e.intent is None or e.intent in allowed for e in examples):
        raise RailproxyError(
            "the data has no text that must not be approved (intent null); "
            "calibration needs out-of-scope examples"
        )


def _round(problem: _Problem, values: Matrix) -> Matrix:
    """PLACES decimals, rounded away from approving; clipped to valid thresholds."""
    scale = 10.0**PLACES
    up, down = np.ceil(values * scale - 1e-6), np.floor(values * scale + 1e-6)
    return problem.pin(np.clip(np.where(problem.prompt, up, down) / scale, -1.0, 1.0))


def _verify(
    problem: _Problem,
    examples: Sequence[Example],
    decisions: Sequence[Decision],
    values: Matrix,
    target: float,
) -> tuple[dict[str, float], Point]:
    """Re-check with `decide` itself. Where its tie rules approve more than the
    emulation did, step every threshold away from approving until the budget holds."""
    while True:
        thresholds = dict(zip(problem.names, values.tolist(), strict=True))
        result = point(problem.rails, examples, decisions, thresholds)
        if result.false_approvals <= problem.budget(target):
            return thresholds, result
        if values[problem.prompt & ~problem.fixed].min(initial=1.0) >= 1.0:
            raise RailproxyError(
                f"no thresholds meet a false-approval rate of {target}: "
                f"{result.false_approvals} must-not-approve texts are approved even at "
                "threshold 1.0 (they repeat examples of prompt intents)"
            )
        values = _round(problem, values + np.where(problem.prompt, 1.0, -1.0) * 10.0**-PLACES)
