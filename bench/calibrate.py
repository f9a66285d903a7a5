"""CLINC150: per-intent calibrated thresholds against one global threshold.

Protocol:

* rails: the first N (10) train utterances of each of the 150 intents, all `prompt`
  intents (bench/clinc.py's `write_clinc_rails`), indexed with the real model;
* calibration data: the rest of train (examples 11..100 of each intent, 13,500)
  plus oos_train (100, intent null);
* evaluation data: val (3,000) + oos_val (100), never seen while calibrating.

For each out-of-scope recall target r, `railproxy.calibrate` is run at a
false-approval target of 1 - r. Both its single global threshold and its
per-intent thresholds are then applied to the evaluation data:

* "as calibrated": the thresholds exactly as chosen on the calibration data;
* "at equal recall": each set of thresholds shifted by one common offset, the
  smallest that reaches recall r on the evaluation data, so both rules are compared
  at the same out-of-scope recall (oos_val has 100 texts: steps of 0.01).

Embeds about 16,600 texts (a few minutes on 2 CPU cores); caches nothing.

    .venv/bin/python bench/calibrate.py [--data-dir ../shared/data] [--per-intent 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from clinc import read_jsonl, write_clinc_rails
from railproxy.calibrate import Point, calibrate_decisions, point
from railproxy.decide import Decision
from railproxy.embed import SentenceTransformerEmbedder
from railproxy.evaluate import Example, decide_all, read_examples
from railproxy.guard import Guard
from railproxy.index import build_index
from railproxy.rails import RailSet, load_rails

REPO = Path(__file__).resolve().parent.parent
RECALLS = (0.85, 0.90, 0.95)


def calibration_data(data: Path, per_intent: int) -> list[Example]:
    """Train utterances not used as rails examples, plus oos_train."""
    used: dict[str, list[str]] = defaultdict(list)  # mirrors write_clinc_rails
    rest = []
    for row in read_jsonl(data / "train.jsonl"):
        intent, text = str(row["intent"]), str(row["text"])
        if len(used[intent]) < per_intent and text not in used[intent]:
            used[intent].append(text)
        else:
            rest.append(Example(text, intent))
    return rest + read_examples(data / "oos_train.jsonl")


def at_recall(
    rails: RailSet,
    examples: Sequence[Example],
    decisions: Sequence[Decision],
    thresholds: dict[str, float],
    recall: float,
) -> tuple[float, Point]:
    """The smallest common shift of `thresholds` reaching `recall` (bisection)."""
    low, high = -0.5, 0.5
    for _ in range(30):
        middle = (low + high) / 2
        shifted = {name: value + middle for name, value in thresholds.items()}
        if 1 - point(rails, examples, decisions, shifted).false_approval >= recall:
            high = middle
        else:
            low = middle
    shifted = {name: value + high for name, value in thresholds.items()}
    return high, point(rails, examples, decisions, shifted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--per-intent", type=int, default=10)
    args = parser.parse_args()
    clinc: Path = args.data_dir / "clinc150"
    calibration = calibration_data(clinc, args.per_intent)
    evaluation = read_examples(clinc / "val.jsonl") + read_examples(clinc / "oos_val.jsonl")
    embedder = SentenceTransformerEmbedder()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rails"
        count = write_clinc_rails(root, read_jsonl(clinc / "train.jsonl"), args.per_intent)
        build_index(load_rails(root), embedder)
        guard = Guard(root, embedder)
        started = time.perf_counter()
        cal_decisions = decide_all(guard, [e.text for e in calibration])
        eval_decisions = decide_all(guard, [e.text for e in evaluation])
        embedded = time.perf_counter() - started
    rails = guard.rails
    print(
        f"rails: {len(rails.intents)} intents, {count} examples; calibration "
        f"{len(calibration)} texts, evaluation {len(evaluation)}; embedded in {embedded:.0f} s"
    )
    print()
    header = (
        f"{'recall':>6}  {'rule':<10} {'calib acc':>9} {'calib rec':>9} | as calibrated: "
        f"{'acc':>5} {'recall':>6} | at equal recall: {'shift':>7} {'acc':>5} {'recall':>6}"
    )
    print(header)
    print("-" * len(header))
    for recall in RECALLS:
        started = time.perf_counter()
        result = calibrate_decisions(rails, calibration, cal_decisions, 1 - recall)
        took = time.perf_counter() - started
        rules = {
            "global": (result.global_thresholds, result.global_point),
            "per-intent": (result.thresholds, result.after),
        }
        for label, (thresholds, fitted) in rules.items():
            applied = point(rails, evaluation, eval_decisions, thresholds)
            shift, matched = at_recall(rails, evaluation, eval_decisions, thresholds, recall)
            print(
                f"{recall:>6.2f}  {label:<10} {fitted.accuracy:>9.3f} "
                f"{1 - fitted.false_approval:>9.3f} | {'':>14}{applied.accuracy:>5.3f} "
                f"{1 - applied.false_approval:>6.3f} | {'':>16} {shift:>+7.4f} "
                f"{matched.accuracy:>5.3f} {1 - matched.false_approval:>6.3f}"
            )
        print(
            f"{'':>6}  global threshold {result.global_threshold:.3f}; per-intent "
            f"{min(result.thresholds.values()):.3f}..{max(result.thresholds.values()):.3f}; "
            f"calibrated in {took:.1f} s"
        )


if __name__ == "__main__":
    main()
