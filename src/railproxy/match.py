"""Step 3: a query vector -> the nearest examples and a score per intent.

Scores are plain cosine similarities in [-1, 1] (the vectors are normalised and
the index is inner-product). An intent's score is computed by `score_intents`
from the nearest examples; see its docstring for the rule and why.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from railproxy.embed import Vectors
from railproxy.errors import GuardUnavailable
from railproxy.index import IntentIndex

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
    results = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        if len(row_ids) == 0 or not np.all(np.isfinite(row_scores)):
            raise GuardUnavailable("the index returned no usable neighbours")
        row = []
        for score, idx in zip(row_scores.tolist(), row_ids.tolist(), strict=True):
            if idx < 0 or idx >= len(index.entries):
                raise GuardUnavailable(f"the index returned an unknown neighbour id {idx}")
            entry = index.entries[idx]
            row.append(Match(intent=entry.intent, example=entry.text, score=float(score)))
        results.append(row)
    return results


def score_intents(matches: Sequence[Match], top: int = 1) -> dict[str, float]:
    """Each intent's score: the mean of its `top` best example similarities.

    With top=1 this is the nearest-neighbour rule. Intents with fewer than `top`
    examples among the neighbours average what they have.
    """
    per_intent: dict[str, list[float]] = defaultdict(list)
    for match in matches:
        if not math.isfinite(match.score):
            raise GuardUnavailable("a similarity score is not a number")
        if len(per_intent[match.intent]) < top:
            per_intent[match.intent].append(match.score)
    return {intent: sum(s) / len(s) for intent, s in per_intent.items()}


def nearest_neighbour(matches: Sequence[Match]) -> dict[str, float]:
    """The baseline rule: an intent scores the similarity of its nearest example."""
    return score_intents(matches, top=1)
