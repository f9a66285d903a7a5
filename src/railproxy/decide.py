"""Step 4: per-intent scores + rails -> a Decision. Pure: no I/O, no model.

An intent is a candidate when its score reaches its threshold (the intent's own,
else the rails default). The best candidate wins; on a tie a refusal beats a
reply, and a reply beats a prompt, so ambiguity never opens the door upstream.
No candidate: `no_match`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from railproxy.errors import GuardUnavailable
from railproxy.match import Match
from railproxy.rails import Intent, RailSet

DecisionAction = Literal["prompt", "refuse", "reply", "no_match"]

# Lower wins a tie: refusals first, approvals last.
_TIE_ORDER = {"refuse": 0, "reply": 1, "prompt": 2}
TIE = 1e-6


@dataclass(frozen=True, slots=True)
class Decision:
    """What the guard decided for one text."""

    action: DecisionAction
    intent: str | None  # None for no_match
    score: float  # the chosen intent's score; for no_match, the best score seen
    threshold: float  # the threshold the score was held to
    neighbours: tuple[Match, ...]
    digest: str  # rails digest of the snapshot that decided
    message: str | None = None  # refusal, reply or no-match text
    upstream_messages: tuple[Mapping[str, str], ...] = ()  # prompt only
    upstream_model: str | None = None  # prompt only
    scores: Mapping[str, float] = field(default_factory=dict)  # every scored intent
    # How refusals are answered under the snapshot that decided (config `refusal`), so a
    # reload between deciding and answering cannot mix two rails versions.
    refusal_mode: Literal["message", "error"] = "message"

    @property
    def approved(self) -> bool:
        return self.action == "prompt"


def decide(
    rails: RailSet,
    scores: Mapping[str, float],
    neighbours: Sequence[Match],
    *,
    user_text: str | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> Decision:
    """Choose the action. `user_text` reaches the result only for opted-in rails.

    `thresholds` overrides the rails' thresholds (by intent name), for sweeps and
    calibration; intents it does not name keep their own.
    """

    def threshold_of(intent: Intent) -> float:
        if thresholds is not None and intent.name in thresholds:
            return thresholds[intent.name]
        return rails.threshold(intent)

    if not scores:
        raise GuardUnavailable("no intent scores to decide on")
    candidates = []
    for name, score in scores.items():
        if not math.isfinite(score):
            raise GuardUnavailable(f"intent {name!r} scored {score}")
        intent = rails.by_name.get(name)
        if intent is None:
            raise GuardUnavailable(f"the index names an unknown intent {name!r}")
        if score >= threshold_of(intent):
            candidates.append((intent, score))
    found = tuple(neighbours)
    scored = dict(scores)
    if not candidates:
        best_name, best = max(scores.items(), key=lambda item: item[1])
        threshold = threshold_of(rails.by_name[best_name])
        return Decision(
            "no_match",
            None,
            best,
            threshold,
            found,
            rails.digest,
            message=rails.config.no_match,
            scores=scored,
            refusal_mode=rails.config.refusal,
        )
    top_score = max(score for _, score in candidates)
    tied = [c for c in candidates if top_score - c[1] <= TIE]
    intent, score = min(tied, key=lambda c: (_TIE_ORDER[c[0].action], -c[1], c[0].name))
    threshold = threshold_of(intent)
    if intent.action != "prompt":
        text = intent.refuse if intent.action == "refuse" else intent.reply
        return Decision(
            intent.action,
            intent.name,
            score,
            threshold,
            found,
            rails.digest,
            message=text,
            scores=scored,
            refusal_mode=rails.config.refusal,
        )
    return Decision(
        "prompt",
        intent.name,
        score,
        threshold,
        found,
        rails.digest,
        upstream_messages=tuple(intent.messages(user_text)),
        upstream_model=rails.upstream_model(intent),
        scores=scored,
        refusal_mode=rails.config.refusal,
    )
