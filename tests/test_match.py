"""Scoring rules on a real index."""

from __future__ import annotations

import numpy as np
import pytest

from railproxy.embed import Embedder
from railproxy.errors import GuardUnavailable
from railproxy.index import load_index
from railproxy.match import Match, nearest, nearest_neighbour, score_intents
from railproxy.rails import load_rails
from tests.conftest import RailsFactory


def test_centroid_scores_every_intent(make_rails: RailsFactory, embedder: Embedder) -> None:
    root = make_rails()
    index, rails = load_index(root), load_rails(root)
    query = embedder.embed(["has my refund been sent"])
    rows = nearest(index, query)
    [scores] = score_intents(index, query, rows, rails)
    assert set(scores) == set(rails.by_name)
    refund = embedder.embed(list(rails.by_name["refund_status"].examples)).mean(axis=0)
    expected = float(query[0] @ (refund / np.linalg.norm(refund)))
    assert scores["refund_status"] == pytest.approx(expected, abs=1e-5)
    assert max(scores, key=scores.__getitem__) == "refund_status"


def test_refusal_scores_its_nearest_example(make_rails: RailsFactory, embedder: Embedder) -> None:
    root = make_rails()
    index, rails = load_index(root), load_rails(root)
    query = embedder.embed(["what medicine should I take for a headache"])  # an exact example
    rows = nearest(index, query)
    [scores] = score_intents(index, query, rows, rails)
    assert scores["medical_advice"] == pytest.approx(1.0, abs=1e-5)
    [baseline] = nearest_neighbour(index, query, rows, rails)
    assert baseline["medical_advice"] == pytest.approx(1.0, abs=1e-5)
    assert baseline["refund_status"] == max(m.score for m in rows[0] if m.intent == "refund_status")


def test_nearest_is_sorted_and_complete(make_rails: RailsFactory, embedder: Embedder) -> None:
    index = load_index(make_rails())
    [row] = nearest(index, embedder.embed(["hi"]))
    assert len(row) == len(index.entries)  # fewer examples than NEIGHBOURS: all of them
    assert [m.score for m in row] == sorted((m.score for m in row), reverse=True)


def test_nan_query_fails_closed(make_rails: RailsFactory) -> None:
    root = make_rails()
    index, rails = load_index(root), load_rails(root)
    query = np.full((1, 384), np.nan, dtype=np.float32)
    with pytest.raises(GuardUnavailable):
        score_intents(index, query, [[Match("greeting", "hi", 0.5)]], rails)
    with pytest.raises(GuardUnavailable):
        nearest(index, query)
