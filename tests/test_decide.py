"""decide() is pure: a table of scores in, a decision out."""

from __future__ import annotations

from pathlib import Path

import pytest

from railproxy.decide import decide
from railproxy.errors import GuardUnavailable
from railproxy.rails import RailSet, load_rails
from tests.conftest import write_rails

RAILS = {
    "config.yaml": "threshold: 0.6\nno_match: nope\n",
    "a.yaml": """\
        intents:
          - name: ask
            examples: [a]
            prompt: Explain A.
          - name: strict
            examples: [s]
            threshold: 0.8
            prompt: Explain S.
          - name: deny
            examples: [d]
            refuse: No.
          - name: hello
            examples: [h]
            reply: Hi.
        """,
}


@pytest.fixture
def rails(tmp_path: Path) -> RailSet:
    return load_rails(write_rails(tmp_path, RAILS))


@pytest.mark.parametrize(
    ("scores", "action", "intent"),
    [
        pytest.param({"ask": 0.7, "deny": 0.2}, "prompt", "ask", id="above-threshold"),
        pytest.param({"ask": 0.59, "deny": 0.2}, "no_match", None, id="below-threshold"),
        pytest.param({"ask": 0.6}, "prompt", "ask", id="at-threshold"),
        pytest.param({"strict": 0.75, "ask": 0.3}, "no_match", None, id="per-intent-threshold"),
        pytest.param({"strict": 0.75, "ask": 0.65}, "prompt", "ask", id="strict-fails-ask-wins"),
        pytest.param({"ask": 0.7, "deny": 0.7}, "refuse", "deny", id="refusal-wins-tie"),
        pytest.param({"ask": 0.7, "hello": 0.7}, "reply", "hello", id="reply-beats-prompt-on-tie"),
        pytest.param({"ask": 0.9, "deny": 0.7}, "prompt", "ask", id="clear-winner"),
        pytest.param({"hello": 0.95}, "reply", "hello", id="reply"),
    ],
)
def test_decide(rails: RailSet, scores: dict[str, float], action: str, intent: str | None) -> None:
    decision = decide(rails, scores, [])
    assert (decision.action, decision.intent) == (action, intent)
    assert decision.approved is (action == "prompt")
    if action == "no_match":
        assert decision.message == "nope"


@pytest.mark.parametrize(
    "scores",
    [
        pytest.param({}, id="empty"),
        pytest.param({"ask": float("nan")}, id="nan"),
        pytest.param({"ask": float("inf")}, id="inf"),
        pytest.param({"ghost": 0.9}, id="unknown-intent"),
    ],
)
def test_never_approves_on_garbage(rails: RailSet, scores: dict[str, float]) -> None:
    with pytest.raises(GuardUnavailable):
        decide(rails, scores, [])


def test_threshold_override(rails: RailSet) -> None:
    assert decide(rails, {"ask": 0.5}, [], thresholds={"ask": 0.4}).action == "prompt"
    assert decide(rails, {"ask": 0.7}, [], thresholds={"ask": 0.8}).action == "no_match"


@pytest.mark.parametrize("mode", ["message", "error"])
def test_a_decision_carries_its_rails_refusal_mode(tmp_path: Path, mode: str) -> None:
    """So a reload between deciding and answering cannot answer with the other mode."""
    files = {**RAILS, "config.yaml": f"threshold: 0.6\nno_match: nope\nrefusal: {mode}\n"}
    rails = load_rails(write_rails(tmp_path, files))
    for scores in ({"deny": 0.9}, {"hello": 0.9}, {"ask": 0.9}, {"ask": 0.1}):
        assert decide(rails, scores, []).refusal_mode == mode
