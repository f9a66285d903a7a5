"""`railproxy calibrate`: thresholds from labelled data, and the YAML edit that saves them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from railproxy.calibrate import calibrate
from railproxy.cli import cli
from railproxy.embed import Embedder
from railproxy.evaluate import Example, evaluate, read_examples
from railproxy.guard import Guard
from railproxy.index import build_index
from railproxy.positions import edit_thresholds, write_thresholds
from railproxy.rails import load_rails
from tests.conftest import RailsFactory, write_rails

CONFIG = "# defaults\nthreshold: 0.6\nno_match: Sorry.\n"
INTENTS = textwrap.dedent(
    """\
    # Support intents. Comments must survive calibration.
    intents:
      - name: refund_status   # money back
        examples:
          - where is my refund
          - has my refund been processed yet
          - when will I get my money back
          - how long does a refund take to arrive
        prompt: Explain how to check a refund.
      - name: reset_password
        threshold: 0.7   # hand-tuned
        examples:
          - I forgot my password
          - how do I reset my password
          - I can't log in to my account
          - the login code never arrived
        prompt: Explain how to reset a password.
      - {name: order_status, examples: [where is my order, track my parcel], prompt: Track.}
      - name: medical_advice
        examples:
          - what medicine should I take for a headache
          - can you diagnose my rash
          - how many ibuprofen can I safely take
        refuse: I can't give medical advice.
    """
)
DATA = [
    ("did my refund go through", "refund_status"),
    ("I am still waiting for my money to come back", "refund_status"),
    ("refund not received yet", "refund_status"),
    ("when does the refund hit my bank", "refund_status"),
    ("how do I change my forgotten password", "reset_password"),
    ("locked out, can't sign in", "reset_password"),
    ("password reset link", "reset_password"),
    ("my sign in code did not come", "reset_password"),
    ("where's my package", "order_status"),
    ("when will my order arrive", "order_status"),
    ("tracking number for my delivery", "order_status"),
    ("is my parcel on its way", "order_status"),
    ("which pills cure a migraine", "medical_advice"),
    ("is this rash serious", "medical_advice"),
    ("write me a poem about the sea", None),
    ("what is the capital of peru", None),
    ("how do I bake sourdough bread", None),
    ("who won the football last night", None),
    ("tell me a joke", None),
    ("my neighbour's dog keeps barking", None),
    ("can you get my money back from a casino", None),
    ("where can I buy a cheap laptop", None),
    ("recommend a film for tonight", None),
    ("how do I password protect a zip file", None),
]


@pytest.fixture
def rails_dir(make_rails: RailsFactory) -> Path:
    root = make_rails({"config.yaml": CONFIG, "support.yaml": INTENTS})
    (root / "data.jsonl").write_text(
        "".join(json.dumps({"text": t, "intent": i}) + "\n" for t, i in DATA), encoding="utf-8"
    )
    return root


def examples() -> list[Example]:
    return [Example(text, intent) for text, intent in DATA]


@pytest.mark.parametrize("target", [0.0, 0.1, 0.3])
def test_chosen_thresholds_meet_the_target_on_the_data(
    rails_dir: Path, embedder: Embedder, target: float
) -> None:
    result = calibrate(Guard(rails_dir, embedder), examples(), target)
    assert result.after.must_not == 12  # 10 out of scope + 2 labelled with a refuse intent
    assert result.after.false_approval <= target
    assert result.global_point.false_approval <= target
    # The written thresholds give the same figures through `evaluate`, from scratch.
    write_thresholds(load_rails(rails_dir), result.thresholds)
    build_index(load_rails(rails_dir), embedder)
    report = evaluate(Guard(rails_dir, embedder), read_examples(rails_dir / "data.jsonl"))
    assert len(report.false_approvals) == result.after.false_approvals
    assert report.accuracy == result.after.accuracy


def test_looser_target_buys_accuracy(rails_dir: Path, embedder: Embedder) -> None:
    guard = Guard(rails_dir, embedder)
    strict, loose = (calibrate(guard, examples(), t) for t in (0.0, 0.3))
    assert loose.after.accuracy >= strict.after.accuracy
    assert loose.after.false_approvals >= strict.after.false_approvals


def test_cli_reports_and_changes_nothing_without_write(rails_dir: Path) -> None:
    before = {p: p.read_bytes() for p in rails_dir.iterdir() if p.is_file()}
    data = str(rails_dir / "data.jsonl")
    result = CliRunner().invoke(cli, ["calibrate", str(rails_dir), data])
    assert result.exit_code == 0, result.output
    assert "per-intent thresholds" in result.output
    assert "nothing written (use --write to save these thresholds)" in result.output
    diff = CliRunner().invoke(cli, ["calibrate", str(rails_dir), data, "--diff"])
    assert diff.exit_code == 0, diff.output
    assert f"--- {rails_dir / 'support.yaml'}" in diff.output
    assert any(line.startswith("+") and "threshold:" in line for line in diff.output.splitlines())
    assert {p: p.read_bytes() for p in rails_dir.iterdir() if p.is_file()} == before


def test_cli_write_keeps_the_yaml_as_written(rails_dir: Path) -> None:
    data = str(rails_dir / "data.jsonl")
    args = ["calibrate", str(rails_dir), data, "--write", "--json", "--target-false-approval=0.1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["per_intent"]["false_approval_rate"] <= 0.1
    assert report["written"] == [str(rails_dir / "support.yaml")]

    text = (rails_dir / "support.yaml").read_text(encoding="utf-8")
    rails = load_rails(rails_dir)  # still valid
    for intent in rails.intents:
        assert intent.threshold == report["thresholds"][intent.name]["calibrated"]
    # Every line that changed or appeared sets a threshold; every comment is still there.
    old, new = INTENTS.splitlines(), text.splitlines()
    assert all("threshold:" in line for line in new if line not in old)
    assert all("threshold:" in line or "order_status" in line for line in old if line not in new)
    assert "order_status, examples:" in text and ", threshold: " in text  # flow style kept
    for comment in ("# Support intents.", "# money back", "# hand-tuned"):
        assert comment in text
    assert text.count("threshold:") == 4
    # the index is stale now, and the CLI says what to do
    assert CliRunner().invoke(cli, ["test", str(rails_dir)]).exit_code == 2


def test_cli_needs_out_of_scope_data(rails_dir: Path) -> None:
    only_in_scope = rails_dir / "in_scope.jsonl"
    only_in_scope.write_text(json.dumps({"text": "where is my refund", "intent": "refund_status"}))
    result = CliRunner().invoke(cli, ["calibrate", str(rails_dir), str(only_in_scope)])
    assert result.exit_code == 2
    assert "no text that must not be approved" in result.output


def test_edit_replaces_or_inserts_and_keeps_line_endings(tmp_path: Path) -> None:
    root = write_rails(tmp_path / "rails", {"support.yaml": INTENTS})
    crlf = root / "support.yaml"
    crlf.write_bytes(INTENTS.replace("\n", "\r\n").encode())
    rails = load_rails(root)
    texts = edit_thresholds(
        rails, {"refund_status": 0.55, "reset_password": 0.625, "order_status": 0.5}
    )
    edited = texts[crlf]
    assert "\n" not in edited.replace("\r\n", "")  # no bare newline was introduced
    lines = edited.split("\r\n")
    name = lines.index("  - name: refund_status   # money back")
    assert lines[name + 1] == "    threshold: 0.55"
    assert "    threshold: 0.625   # hand-tuned" in lines
    assert "prompt: Track., threshold: 0.5}" in edited
    assert crlf.read_bytes() == INTENTS.replace("\n", "\r\n").encode()  # not written yet
    write_thresholds(rails, {"refund_status": 0.55})
    assert load_rails(root).by_name["refund_status"].threshold == 0.55
