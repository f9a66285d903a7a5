"""`railproxy lint`: each kind of finding planted in clean rails, with the real model."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from railproxy.cli import cli
from railproxy.embed import Embedder
from railproxy.guard import Guard
from railproxy.lint import Finding, lint
from tests.conftest import SUPPORT_RAILS, RailsFactory

CLEAN = textwrap.dedent(
    """\
    intents:
      - name: refund_status
        examples:
          - where is my refund
          - has my refund been processed yet
          - when will I get my money back
          - how long does a refund take to arrive
          - I returned an item weeks ago and still have not been repaid
        prompt: Explain how to check a refund.
      - name: reset_password
        examples:
          - I forgot my password
          - how do I reset my password
          - I can't log in to my account
          - the login code never arrived on my phone
          - my account is locked after too many attempts
        prompt: Explain how to reset a password.
      - name: medical_advice
        examples:
          - what medicine should I take for a headache
          - can you diagnose my rash
          - is this mole on my back cancerous
          - how many ibuprofen can I safely take
          - should I see a doctor about my chest pain
        refuse: I can't give medical advice.
    """
)


def files(intents: str) -> dict[str, str]:
    return {"config.yaml": SUPPORT_RAILS["config.yaml"], "intents.yaml": intents}


def planted(old: str, new: str) -> str:
    assert old in CLEAN
    return CLEAN.replace(old, new, 1)


def findings(make_rails: RailsFactory, embedder: Embedder, intents: str) -> list[Finding]:
    return lint(Guard(make_rails(files(intents)), embedder))


def line_of(text: str, needle: str) -> int:
    """1-based line of `needle` in a rails file."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_clean_rails_have_no_findings(make_rails: RailsFactory, embedder: Embedder) -> None:
    assert findings(make_rails, embedder, CLEAN) == []


PLANTS = [
    pytest.param(
        # a password question filed under refunds
        planted("- how long does a refund take to arrive", "- I need to reset my password"),
        "misplaced",
        "refund_status",
        "I need to reset my password",
        id="misplaced",
    ),
    pytest.param(
        # a refused medical question also listed as an approved refund question
        planted(
            "- how long does a refund take to arrive",
            "- what medicine should I take for a headache",
        ),
        "conflict",
        "refund_status",
        "what medicine should I take for a headache",
        id="conflict-identical",
    ),
    pytest.param(
        planted(
            "- how long does a refund take to arrive",
            "- What medicine should I take for a headache?",
        ),
        "conflict",
        "refund_status",
        "What medicine should I take for a headache?",
        id="conflict-near-copy",
    ),
    pytest.param(
        planted("- how long does a refund take to arrive", "- where's my refund"),
        "duplicate",
        "refund_status",
        "where's my refund",
        id="duplicate-within",
    ),
    pytest.param(
        planted("- how do I reset my password", "- When will I get my money back"),
        "duplicate",
        "reset_password",
        "When will I get my money back",
        id="duplicate-between",
    ),
    pytest.param(
        CLEAN + "  - name: opening_hours\n    examples: [when are you open, what are your hours]\n"
        "    prompt: Give the opening hours.\n",
        "few_examples",
        "opening_hours",
        "- name: opening_hours",
        id="few-examples",
    ),
    pytest.param(
        CLEAN + "  - name: cancel_order\n    examples:\n"
        "      - cancel my order\n      - please cancel my order\n      - cancel my order now\n"
        "      - I want to cancel my order\n      - can you cancel my order\n"
        "    prompt: Explain how to cancel an order.\n",
        "low_diversity",
        "cancel_order",
        "- name: cancel_order",
        id="low-diversity",
    ),
]


@pytest.mark.parametrize(("intents", "kind", "intent", "needle"), PLANTS)
def test_planted_finding_is_reported_at_its_line(
    make_rails: RailsFactory, embedder: Embedder, intents: str, kind: str, intent: str, needle: str
) -> None:
    line = line_of(intents, needle)
    found = [f for f in findings(make_rails, embedder, intents) if f.kind == kind]
    here = [f for f in found if f.source.line == line]
    assert [(f.intent, f.source.path.name) for f in here] == [(intent, "intents.yaml")], found
    assert here[0].fix


def test_capture_points_at_the_taker_threshold(
    make_rails: RailsFactory, embedder: Embedder
) -> None:
    # An "account security" intent full of lock-outs takes reset_password's
    # lock-out example.
    intents = CLEAN + (
        "  - name: account_security\n"
        "    examples:\n"
        "      - my account was locked\n"
        "      - I'm locked out of my account\n"
        "      - my account got blocked after failed logins\n"
        "      - someone got into my account\n"
        "      - was my account hacked\n"
        "      - account locked after too many password attempts\n"
        "    threshold: 0.3\n"
        "    prompt: Explain account security.\n"
    )
    found = [f for f in findings(make_rails, embedder, intents) if f.kind == "capture"]
    assert found, "expected account_security to capture an example"
    assert {f.intent for f in found} == {"account_security"}
    assert {f.source.line for f in found} == {line_of(intents, "threshold: 0.3")}
    assert any("my account is locked after too many attempts" in f.message for f in found)
    assert "raise 'account_security''s threshold above" in found[0].fix


def test_cli_exit_codes_and_json(make_rails: RailsFactory) -> None:
    clean = make_rails(files(CLEAN), name="clean")
    result = CliRunner().invoke(cli, ["lint", str(clean)])
    assert result.exit_code == 0, result.output
    assert "0 finding(s)" in result.output

    dirty = make_rails(files(str(PLANTS[0].values[0])), name="dirty")
    result = CliRunner().invoke(cli, ["lint", str(dirty)])
    assert result.exit_code == 1
    line = line_of(str(PLANTS[0].values[0]), "I need to reset my password")
    assert f"{dirty / 'intents.yaml'}:{line}: misplaced: example 'I need to reset my password'" in (
        result.output
    )
    assert "    fix: move it to 'reset_password'" in result.output

    result = CliRunner().invoke(cli, ["lint", str(dirty), "--json"])
    assert result.exit_code == 1
    reported = json.loads(result.output)
    assert {r["kind"] for r in reported} >= {"misplaced"}
    assert all({"file", "line", "message", "fix", "intent"} <= r.keys() for r in reported)

    kinds = sorted({r["kind"] for r in reported})
    ignored = CliRunner().invoke(cli, ["lint", str(dirty), *[f"--ignore={k}" for k in kinds]])
    assert ignored.exit_code == 0, ignored.output
