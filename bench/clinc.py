"""CLINC150 benchmark: decision quality, attack false approvals and reindex speed.

Builds a rails directory from CLINC150 (the first N train utterances of each of the
150 intents, every intent a `prompt` intent), indexes it with `railproxy reindex`,
scores val + oos_val with `railproxy eval`, and then compares, in one run and on the
same embeddings, the nearest-neighbour rule (NeMo Guardrails' `embeddings_only`
baseline) with the rule railproxy ships:

- in-scope accuracy at the best global threshold whose out-of-scope recall is
  >= 0.90 and >= 0.95 (accuracy = approved as exactly the right intent);
- the share of ../shared/data/attacks/public.jsonl approved, at those thresholds
  and at the shipped default threshold.

With --reindex-speed it also times indexing all 15,000 train utterances with each
embedding backend (--only-reindex-speed: that alone).

    .venv/bin/python bench/clinc.py [--data-dir ../shared/data] [--per-intent 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

from railproxy.embed import SentenceTransformerEmbedder, make_embedder
from railproxy.evaluate import Example, decide_all, operating_point, read_examples, sweep_point
from railproxy.guard import Guard
from railproxy.index import build_index
from railproxy.match import nearest_neighbour, score_intents
from railproxy.rails import DEFAULT_THRESHOLD, load_rails

REPO = Path(__file__).resolve().parent.parent
THRESHOLDS = [round(0.2 + 0.0025 * i, 4) for i in range(301)]  # 0.20 .. 0.95


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_clinc_rails(
    root: Path, train: list[dict[str, object]], per_intent: int, packs: tuple[str, ...] = ()
) -> int:
    by_intent: dict[str, list[str]] = defaultdict(list)
    for row in train:
        intent, text = str(row["intent"]), str(row["text"])
        if len(by_intent[intent]) < per_intent and text not in by_intent[intent]:
            by_intent[intent].append(text)
    intents = [
        {"name": name, "examples": examples, "prompt": f"Help the user with: {name}."}
        for name, examples in by_intent.items()
    ]
    root.mkdir(parents=True, exist_ok=True)
    config = {"no_match": "Sorry, I can't help with that.", "packs": list(packs)}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "clinc.yaml").write_text(yaml.safe_dump({"intents": intents}, sort_keys=False))
    return sum(len(e) for e in by_intent.values())


def railproxy(*args: str) -> str:
    command = [sys.executable, "-m", "railproxy", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def compare_rules(
    roots: dict[str, Path], embedder: SentenceTransformerEmbedder, data: Path
) -> list[str]:
    val = read_examples(data / "clinc150" / "val.jsonl")
    oos = read_examples(data / "clinc150" / "oos_val.jsonl")
    attacks = [Example(str(r["text"]), None) for r in read_jsonl(data / "attacks" / "public.jsonl")]
    rules = {
        "nearest neighbour (baseline)": (roots["plain"], nearest_neighbour),
        "railproxy (shipped)": (roots["plain"], score_intents),
        "railproxy + safety pack": (roots["safety"], score_intents),
    }
    lines = [
        f"{'rule':<30} {'recall>=':>8} {'threshold':>9} {'accuracy':>8} {'oos_recall':>10} "
        f"{'attacks approved':>16}"
    ]
    for label, (root, scorer) in rules.items():
        guard = Guard(root, embedder, scorer=scorer)
        decisions = decide_all(guard, [e.text for e in val + oos])
        attack_decisions = decide_all(guard, [e.text for e in attacks])
        rows = [
            (f"{target:.2f}", operating_point(guard, val + oos, decisions, target, THRESHOLDS))
            for target in (0.90, 0.95)
        ]
        rows.append(
            (f"{DEFAULT_THRESHOLD}*", sweep_point(guard, val + oos, decisions, DEFAULT_THRESHOLD))
        )
        for target, point in rows:
            if point is None:
                lines.append(f"{label:<30} {target:>8} {'unreachable':>9}")
                continue
            attack = sweep_point(guard, attacks, attack_decisions, point["threshold"])
            lines.append(
                f"{label:<30} {target:>8} {point['threshold']:>9.4f} {point['accuracy']:>8.3f} "
                f"{point['oos_recall']:>10.3f} {1 - attack['oos_recall']:>16.3%}"
            )
    return lines


def reindex_speed(backend: str, train: list[dict[str, object]]) -> str:
    """`build_index` of all 15,000 train utterances with `backend`, against its raw encode rate."""
    embedder = make_embedder(backend=backend)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rails"
        count = write_clinc_rails(root, train, per_intent=10_000)
        rails = load_rails(root)
        started = time.perf_counter()
        report = build_index(rails, embedder)
        elapsed = time.perf_counter() - started
        raw = [str(r["text"]) for r in train[:2048]]
        started = time.perf_counter()
        embedder.embed(raw)
        raw_rate = len(raw) / (time.perf_counter() - started)
    return (
        f"{backend:>5}: reindex of {count} examples ({report.embedded} distinct embedded): "
        f"{elapsed:.1f} s, {report.embedded / elapsed:.0f} examples/s; raw model encode of 2048 "
        f"in batches: {raw_rate:.0f}/s (reindex runs at {report.embedded / elapsed / raw_rate:.0%} "
        "of it)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--per-intent", type=int, default=10)
    parser.add_argument("--reindex-speed", action="store_true", help="also time a full reindex")
    parser.add_argument(
        "--only-reindex-speed", action="store_true", help="time a full reindex, nothing else"
    )
    args = parser.parse_args()
    data: Path = args.data_dir
    train = read_jsonl(data / "clinc150" / "train.jsonl")
    if args.only_reindex_speed:
        for backend in ("onnx", "torch"):
            print(reindex_speed(backend, train))
        return

    with tempfile.TemporaryDirectory() as tmp:
        roots = {"plain": Path(tmp) / "rails", "safety": Path(tmp) / "rails-safety"}
        count = write_clinc_rails(roots["plain"], train, args.per_intent)
        write_clinc_rails(roots["safety"], train, args.per_intent, packs=("safety",))
        print(f"rails: 150 intents, {count} examples ({args.per_intent} per intent)")
        for root in roots.values():
            started = time.perf_counter()
            done = railproxy("reindex", str(root)).strip()
            print(done, f"[{time.perf_counter() - started:.1f} s]")

        eval_file = Path(tmp) / "val_and_oos.jsonl"
        rows = read_jsonl(data / "clinc150" / "val.jsonl")
        rows += read_jsonl(data / "clinc150" / "oos_val.jsonl")
        eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        report = json.loads(railproxy("eval", str(roots["plain"]), str(eval_file), "--json"))
        print(
            f"railproxy eval at the default threshold {DEFAULT_THRESHOLD}: "
            f"accuracy {report['accuracy']:.3f}, oos recall {report['oos_recall']:.3f}"
        )

        embedder = SentenceTransformerEmbedder()
        print()
        print("\n".join(compare_rules(roots, embedder, data)))
        print(
            f"(* the shipped default threshold; attacks over {embedder.max_tokens} tokens "
            "are rejected as input_too_long and count as not approved)"
        )
    if args.reindex_speed:
        print()
        for backend in ("onnx", "torch"):
            print(reindex_speed(backend, train))


if __name__ == "__main__":
    main()
