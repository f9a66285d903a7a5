"""The CLI through click's CliRunner, with the real model."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from railproxy.cli import cli
from railproxy.index import index_dir
from tests.conftest import SUPPORT_RAILS, RailsFactory, write_rails


def test_reindex_then_nothing_to_do(tmp_path: Path) -> None:
    root = write_rails(tmp_path / "rails", SUPPORT_RAILS)
    runner = CliRunner()
    first = runner.invoke(cli, ["reindex", str(root)])
    assert first.exit_code == 0, first.output
    assert "Indexed 10 examples in 4 intents (10 embedded, 0 reused)" in first.output
    second = runner.invoke(cli, ["reindex", str(root)])
    assert "(0 embedded, 10 reused)" in second.output


def test_reindex_error_exits_non_zero_and_keeps_index(make_rails: RailsFactory) -> None:
    root = make_rails()
    before = {p.name: p.read_bytes() for p in index_dir(root).iterdir()}
    (root / "oops.yaml").write_text("intents:\n  - name: x\n    examples: [a]\n    colour: red\n")
    result = CliRunner().invoke(cli, ["reindex", str(root)])
    assert result.exit_code == 1
    assert f"{root / 'oops.yaml'}:4: intent 'x'" in result.output
    assert {p.name: p.read_bytes() for p in index_dir(root).iterdir()} == before


def test_match_json(make_rails: RailsFactory) -> None:
    root = make_rails()
    result = CliRunner().invoke(cli, ["match", str(root), "is my refund processed", "--json"])
    assert result.exit_code == 0, result.output
    decision = json.loads(result.output)
    assert decision["action"] == "prompt"
    assert decision["intent"] == "refund_status"
    assert decision["neighbours"][0]["intent"] == "refund_status"
    assert decision["upstream_model"] == "gpt-4o-mini"


def test_match_text(make_rails: RailsFactory) -> None:
    result = CliRunner().invoke(cli, ["match", str(make_rails()), "what is the capital of peru"])
    assert result.exit_code == 0
    assert result.output.startswith("decision: no_match")
    assert "answer:   Sorry, I can only help with ACME billing." in result.output


def test_match_on_stale_index_says_how_to_fix(make_rails: RailsFactory) -> None:
    root = make_rails()
    (root / "config.yaml").write_text("threshold: 0.5\n")
    result = CliRunner().invoke(cli, ["match", str(root), "hi"])
    assert result.exit_code == 1
    assert f"run: railproxy reindex {root}" in result.output


def test_eval(make_rails: RailsFactory, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [
        {"text": "did you process my refund", "intent": "refund_status"},
        {"text": "good evening", "intent": "greeting"},
        {"text": "which antibiotic cures flu", "intent": None},
        {"text": "recommend a good movie", "intent": None},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(cli, ["eval", str(make_rails()), str(data), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["in_scope"], report["out_of_scope"]) == (2, 2)
    assert report["accuracy"] == 1.0
    assert report["oos_recall"] == 1.0
    assert report["false_approvals"] == 0
    sweep = {p["threshold"]: p for p in report["threshold_sweep"]}
    assert sweep[0.9]["accuracy"] < 1.0  # nothing clears 0.9 on these paraphrases


def test_eval_bad_line(make_rails: RailsFactory, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "hi", "intent": null}\n{"txt": "x"}\n')
    result = CliRunner().invoke(cli, ["eval", str(make_rails()), str(data)])
    assert result.exit_code == 1
    assert "bad.jsonl:2" in result.output
