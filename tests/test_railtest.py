"""`railproxy test`: intents' own tests and JSONL files, with the real model."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from railproxy.cli import cli
from railproxy.embed import Embedder
from railproxy.guard import Guard
from railproxy.rails import load_rails
from railproxy.railtest import collect, run
from tests.conftest import SUPPORT_RAILS, RailsFactory

TESTED = """\
    intents:
      - name: refund_status
        examples:
          - where is my refund
          - has my refund been processed yet
          - when will I get my money back
        prompt: Explain how to check a refund.
        tests:
          match:
            - did my refund go through
            - is my refund on its way
          no_match:
            - what medicine helps a migraine
      - name: medical_advice
        examples:
          - what medicine should I take for a headache
          - can you diagnose my rash
        refuse: I can't give medical advice.
        tests:
          match: [which pills should I take for my headache]
      - name: greeting
        examples: [hi, hello there, good morning]
        reply: Hi!
        tests:
          match: [hello]
          no_match: [where is my refund please]
    """
# Cases that cannot pass: a poem is not a refund; the refund question is a refund.
BROKEN = TESTED.replace("- is my refund on its way", "- write me a poem about the sea").replace(
    "- what medicine helps a migraine", "- where has my refund got to"
)
PASSING_LINES: list[dict[str, str | None]] = [
    {"text": "hello there, anyone around?", "intent": "greeting"},
    {"text": "which antibiotic should I take", "intent": None},
]


def rails_files(intents: str) -> dict[str, str]:
    return {"config.yaml": SUPPORT_RAILS["config.yaml"], "intents.yaml": intents}


def write_jsonl(path: Path, rows: list[dict[str, str | None]], blank_first: bool = False) -> None:
    lines = [json.dumps(row) + "\n" for row in rows]
    path.write_text(("\n" if blank_first else "") + "".join(lines), encoding="utf-8")


def test_collect_finds_every_case_with_its_own_line(make_rails: RailsFactory) -> None:
    root = make_rails(rails_files(TESTED), index=False)
    write_jsonl(root / "extra.jsonl", PASSING_LINES, blank_first=True)
    cases = collect(load_rails(root))
    assert [(c.kind, c.intent) for c in cases] == [
        ("match", "refund_status"),
        ("match", "refund_status"),
        ("no_match", "refund_status"),
        ("match", "medical_advice"),
        ("match", "greeting"),
        ("no_match", "greeting"),
        ("data", "greeting"),
        ("data", None),
    ]
    lines = (root / "intents.yaml").read_text().splitlines()
    for case in cases[:6]:
        assert case.source.path == root / "intents.yaml"
        assert case.text in lines[case.source.line - 1]
    assert [c.source.line for c in cases[6:]] == [2, 3]  # the blank first line is counted


def test_passing_rails(make_rails: RailsFactory, embedder: Embedder) -> None:
    root = make_rails(rails_files(TESTED))
    write_jsonl(root / "extra.jsonl", PASSING_LINES)
    report = run(Guard(root, embedder))
    assert len(report.outcomes) == 8
    assert report.ok, [(o.case.text, o.explain()) for o in report.failures]
    refused = next(o for o in report.outcomes if o.case.text == PASSING_LINES[1]["text"])
    assert refused.got in {"medical_advice", "no_match"}


def test_failures_say_what_happened(make_rails: RailsFactory, embedder: Embedder) -> None:
    root = make_rails(rails_files(BROKEN))
    write_jsonl(root / "extra.jsonl", [{"text": "where is my refund", "intent": None}])
    report = run(Guard(root, embedder))
    failed = {o.case.text: o for o in report.failures}
    assert set(failed) == {
        "write me a poem about the sea",
        "where has my refund got to",
        "where is my refund",
    }
    poem = failed["write me a poem about the sea"]
    assert poem.got == "no_match"
    assert poem.explain().startswith("got no_match: refund_status scored")
    assert "(threshold 0.600)" in poem.explain()
    stray = failed["where has my refund got to"]
    assert (stray.case.kind, stray.got) == ("no_match", "refund_status")
    approved = failed["where is my refund"]
    assert approved.case.expectation == "not approved"
    assert approved.explain().startswith("got refund_status (prompt) at ")
    assert approved.explain().endswith(">= threshold 0.600")


def test_cli_passes_with_exit_zero(make_rails: RailsFactory) -> None:
    root = make_rails(rails_files(TESTED))
    result = CliRunner().invoke(cli, ["test", str(root)])
    assert result.exit_code == 0, result.output
    assert result.output.count("PASS") == 6
    assert "FAIL" not in result.output
    assert result.output.rstrip().endswith("0 failed, 6 passed")
    assert f"{root / 'intents.yaml'}:" in result.output


def test_cli_fails_with_exit_one_and_writes_junit(make_rails: RailsFactory, tmp_path: Path) -> None:
    root = make_rails(rails_files(BROKEN))
    junit = tmp_path / "report.xml"
    result = CliRunner().invoke(cli, ["test", str(root), "-q", "--junit", str(junit)])
    assert result.exit_code == 1, result.output
    assert "PASS" not in result.output  # --quiet lists failures only
    assert result.output.count("FAIL") == 2
    assert "got no_match: refund_status scored" in result.output
    assert result.output.rstrip().endswith("2 failed, 4 passed")

    suites = ET.fromstring(junit.read_bytes())
    assert suites.tag == "testsuites"
    assert (suites.get("tests"), suites.get("failures")) == ("6", "2")
    cases = suites.findall("testsuite/testcase")
    assert len(cases) == 6
    failures = [c for c in cases if c.find("failure") is not None]
    assert sorted(c.get("name", "") for c in failures) == [
        "match: write me a poem about the sea",
        "no_match: where has my refund got to",
    ]
    assert all(c.get("file") == str(root / "intents.yaml") for c in cases)


def test_cli_json(make_rails: RailsFactory) -> None:
    root = make_rails(rails_files(BROKEN))
    write_jsonl(root / "extra.jsonl", PASSING_LINES)
    result = CliRunner().invoke(cli, ["test", str(root), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert (report["passed"], report["failed"]) == (6, 2)
    data = [c for c in report["cases"] if c["kind"] == "data"]
    assert [(c["file"], c["line"], c["passed"]) for c in data] == [
        (str(root / "extra.jsonl"), 1, True),
        (str(root / "extra.jsonl"), 2, True),
    ]
    assert {c["expected"] for c in data} == {"greeting", "not approved"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param(
            '{"text": "hi", "intent": "nope"}\n', "extra.jsonl:1: unknown intent", id="intent"
        ),
        pytest.param('{"words": "hi"}\n', "extra.jsonl:1: expected", id="shape"),
    ],
)
def test_cli_bad_data_exits_two(make_rails: RailsFactory, line: str, message: str) -> None:
    root = make_rails(rails_files(TESTED))
    (root / "extra.jsonl").write_text(line, encoding="utf-8")
    result = CliRunner().invoke(cli, ["test", str(root)])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_stale_index_exits_two_unless_reindex(make_rails: RailsFactory) -> None:
    root = make_rails(rails_files(TESTED))
    (root / "intents.yaml").write_text(
        (root / "intents.yaml").read_text()
        + "  - name: bye\n    examples: [goodbye]\n    reply: Bye!\n"
    )
    stale = CliRunner().invoke(cli, ["test", str(root)])
    assert stale.exit_code == 2
    assert f"run: railproxy reindex {root}" in stale.output
    fixed = CliRunner().invoke(cli, ["test", str(root), "--reindex"])
    assert fixed.exit_code == 0, fixed.output
