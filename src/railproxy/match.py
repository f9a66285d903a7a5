"""Step 3: a query vector -> the nearest examples and a score per intent.

Scores are plain cosine similarities in [-1, 1] (the vectors are normalised and
the index is inner-product). An intent's score is computed by `score_intents`
from the nearest examples; see its docstring for the rule and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from railproxy.embed import Vectors
from railproxy.errors import GuardUnavailable
from railproxy.index import IntentIndex
from railproxy.rails import RailSet

NEIGHBOURS = 32  # examples fetched per query; enough to score every plausible intent


@dataclass(frozen=True, slots=True)
class Match:
    """One example near the query."""

    intent: str
    example: str
    score: float


def nearest(index: IntentIndex, vectors: Vectors, k: int = NEIGHBOURS) -> list[list[Match]]:
    """The k nearest examples of each query row, best first.

    Raises GuardUnavailable on anything that would make a decision unsafe: NaN
    scores, a missing neighbour (-1 id), an id outside the manifest.
    """
    if not index.entries:
        raise GuardUnavailable("the index is empty")
    scores, ids = index.search(vectors, k)
    if ids.shape[1] == 0 or not np.isfinite(scores).all():  # one check for the whole batch
        raise GuardUnavailable("the index returned no usable neighbours")
    entries, count = index.entries, len(index.entries)
    results = []
    for row_scores, row_ids in zip(scores.tolist(), ids.tolist(), strict=True):
        row = []
        for score, idx in zip(row_scores, row_ids, strict=True):
            if not 0 <= idx < count:
                raise GuardUnavailable(f"the index returned an unknown neighbour id {idx}")
            entry = entries[idx]
            row.append(Match(intent=entry.intent, example=entry.text, score=score))
        results.append(row)
    return results


def score_intents(
    index: IntentIndex, vectors: Vectors, neighbours: Sequence[Sequence[Match]], rails: RailSet
) -> list[dict[str, float]]:
    """The shipped rule: each intent scores the cosine between the query and the
    intent's centroid (the normalised mean of its example vectors).

    Measured on CLINC150 with 10 examples per intent (bench/decision_rules.py),
    the centroid rule gives 0.815 in-scope accuracy at 0.90 out-of-scope recall
    against 0.738 for nearest-neighbour: averaging the examples cancels their
    individual quirks, so stray similarity to one example no longer approves.

    A refusal intent scores the higher of its centroid cosine and its nearest
    example's cosine: refusals fire on any one close example, approvals need
    the whole intent. Scores stay plain cosines in [-1, 1].
    """
    centroid = np.asarray(vectors, dtype=np.float32) @ index.centroids.T
    if not np.all(np.isfinite(centroid)):
        raise GuardUnavailable("a similarity score is not a number")
    refusals = rails.refusals
    results = []
    for row, matches in zip(centroid.tolist(), neighbours, strict=True):
        scores = dict(zip(index.intents, row, strict=True))
        for intent, best in _nearest_per_intent(matches).items():
            if intent in refusals and best > scores[intent]:
                scores[intent] = best
        results.append(scores)
    return results


def nearest_neighbour(
    index: IntentIndex, vectors: Vectors, neighbours: Sequence[Sequence[Match]], rails: RailSet
) -> list[dict[str, float]]:
    """The baseline rule (NeMo Guardrails' embeddings_only): an intent scores the
    cosine of its nearest example; intents absent from the neighbours are not scored."""
    return [_nearest_per_intent(matches) for matches in neighbours]


def _nearest_per_intent(matches: Sequence[Match]) -> dict[str, float]:
    best: dict[str, float] = {}
    for match in matches:  # best first
        if not math.isfinite(match.score):
            raise GuardUnavailable("a similarity score is not a number")
        best.setdefault(match.intent, match.score)
    return best
