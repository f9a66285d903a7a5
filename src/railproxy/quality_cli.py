"""`railproxy test`, `lint` and `calibrate`: parse -> core -> echo.

Each exits non-zero when the rails are not good enough (failed tests, findings),
so an operator's CI can run them. Colour only reaches a terminal (click.echo
strips it otherwise); `--json` prints machine-readable reports.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import click

from railproxy.errors import IndexProblem, RailproxyError

if TYPE_CHECKING:
    from railproxy.calibrate import Calibration, Point
    from railproxy.guard import Guard

P = ParamSpec("P")
R = TypeVar("R")

RAILS_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
DATA_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
REINDEX = click.option(
    "--reindex", is_flag=True, help="Rebuild the index first if it is missing or stale."
)
TEXT_WIDTH = 48


class CannotCheck(click.ClickException):
    """The check could not run (bad rails, stale index, bad data): exit status 2."""

    exit_code = 2


def domain_errors(func: Callable[P, R]) -> Callable[P, R]:
    """A RailproxyError becomes a one-line message and exit status 2, so that 1
    always means "the rails failed the check"."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except RailproxyError as exc:
            raise CannotCheck(str(exc)) from exc

    return wrapper


@click.command(name="test")
@click.argument("rails_dir", type=RAILS_DIR)
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="List failures only.")
@REINDEX
@domain_errors
def test_command(
    rails_dir: Path, junit: Path | None, as_json: bool, quiet: bool, reindex: bool
) -> None:
    """Run the tests of RAILS_DIR: every intent's `tests:` and RAILS_DIR/*.jsonl.

    Exits 1 if any case fails.
    """
    from railproxy.railtest import run

    report = run(open_guard(rails_dir, reindex))
    if junit is not None:
        junit.write_bytes(report.junit_xml())
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        rows = []
        for o in report.outcomes:
            if quiet and o.passed:
                continue
            verdict = click.style("PASS", fg="green") if o.passed else click.style("FAIL", fg="red")
            rows.append(
                [
                    verdict,
                    str(o.case.source),
                    o.case.expectation,
                    _clip(o.case.text),
                    o.got,
                    f"{o.decision.score:.3f}",
                ]
            )
            if not o.passed:
                rows.append(["", "", "", f"  {o.explain()}"])
        _table(rows, header=["", "where", "expected", "text", "got", "score"])
        failed = len(report.failures)
        summary = f"{failed} failed, {len(report.outcomes) - failed} passed"
        click.echo(click.style(summary, fg="red" if failed else "green", bold=True))
    if not report.ok:
        raise SystemExit(1)


@click.command()
@click.argument("rails_dir", type=RAILS_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option(
    "--ignore",
    multiple=True,
    type=click.Choice(
        ["misplaced", "conflict", "duplicate", "few_examples", "low_diversity", "capture"]
    ),
    help="A kind of finding to leave out (repeatable).",
)
@REINDEX
@domain_errors
def lint(rails_dir: Path, as_json: bool, ignore: Sequence[str], reindex: bool) -> None:
    """Find examples and thresholds in RAILS_DIR that make the guard decide badly.

    Exits 1 if there are findings.
    """
    from railproxy.lint import lint as find

    findings = [f for f in find(open_guard(rails_dir, reindex)) if f.kind not in ignore]
    if as_json:
        click.echo(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for f in findings:
            click.echo(f"{f.source}: {click.style(f.kind, fg='yellow', bold=True)}: {f.message}")
            click.echo(f"    fix: {f.fix}")
        counts = Counter(f.kind for f in findings)
        detail = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        summary = f"{len(findings)} finding(s)" + (f": {detail}" if detail else "")
        click.echo(click.style(summary, fg="red" if findings else "green", bold=True))
    if findings:
        raise SystemExit(1)


@click.command()
@click.argument("rails_dir", type=RAILS_DIR)
@click.argument("data", type=DATA_FILE)
@click.option(
    "--target-false-approval",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.05,
    show_default=True,
    help="Highest share of must-not-approve texts (intent null, or a refuse/reply "
    "intent) that may be approved.",
)
@click.option("--write", is_flag=True, help="Write the thresholds into the rails YAML.")
@click.option("--diff", "show_diff", is_flag=True, help="Print the YAML edit as a diff.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@REINDEX
@domain_errors
def calibrate(
    rails_dir: Path,
    data: Path,
    target_false_approval: float,
    write: bool,
    show_diff: bool,
    as_json: bool,
    reindex: bool,
) -> None:
    """Choose per-intent thresholds from the labelled JSONL file DATA.

    Lines are {"text": ..., "intent": NAME or null}; null means "must not be
    approved". Nothing changes on disk without --write.
    """
    from railproxy.calibrate import calibrate as fit
    from railproxy.evaluate import read_examples
    from railproxy.positions import edit_thresholds, write_thresholds

    if show_diff and as_json:
        raise click.UsageError("--diff and --json cannot be combined")
    guard = open_guard(rails_dir, reindex)
    result = fit(guard, read_examples(data), target_false_approval)
    changed = {name: new for name, (_, new) in result.changed().items()}
    if show_diff:
        for path, text in edit_thresholds(guard.rails, changed).items():
            old = path.read_text(encoding="utf-8").splitlines(keepends=True)
            lines = difflib.unified_diff(old, text.splitlines(keepends=True), str(path), str(path))
            click.echo("".join(lines), nl=False)
    written = write_thresholds(guard.rails, changed) if write and changed else []
    if as_json:
        click.echo(json.dumps(_calibration_json(result, written), indent=2))
        return
    if not show_diff:
        _report_calibration(result)
    if written:
        click.echo(f"wrote {len(written)} file(s); now run: railproxy reindex {rails_dir}")
    elif changed and not write:
        click.echo("nothing written (use --write to save these thresholds)")


def open_guard(root: Path, reindex: bool) -> Guard:
    """The guard for `root`; with `reindex`, rebuild a missing or stale index first."""
    from railproxy.embed import make_embedder
    from railproxy.guard import Guard
    from railproxy.index import build_index, load_index
    from railproxy.rails import load_rails

    rails = load_rails(root)
    embedder = make_embedder(rails.config.model)
    if reindex:
        try:
            load_index(root, model=embedder.name)
        except IndexProblem:
            build_index(rails, embedder)
    return Guard(root, embedder)


def _report_calibration(result: Calibration) -> None:
    from railproxy.calibrate import PRIOR

    first = result.after
    click.echo(
        f"{first.in_scope} in-scope texts, {first.must_not} that must not be approved; "
        f"target false-approval rate {result.target:.3f}"
    )
    rows = [
        [label, f"{p.accuracy:.3f}", f"{p.false_approval:.3f} ({p.false_approvals})"]
        for label, p in (
            ("current thresholds", result.before),
            (f"one threshold {result.global_threshold:.3f}", result.global_point),
            ("per-intent thresholds", result.after),
        )
    ]
    _table(rows, header=["", "accuracy", "false approvals"])
    click.echo()
    rows = []
    for name, (old, new) in sorted(result.changed().items()):
        texts = result.own_texts[name]
        colour = "green" if new > old else "yellow"
        rows.append(
            [
                name,
                str(texts),
                f"{old:.3f}",
                click.style(f"{new:.3f}", fg=colour),
                f"{new - old:+.3f}",
                "few texts: kept near the global value" if texts < PRIOR else "",
            ]
        )
    _table(rows, header=["intent", "texts", "current", "calibrated", "change", ""])
    if not rows:
        click.echo("every threshold is already calibrated")


def _calibration_json(result: Calibration, written: list[Path]) -> dict[str, object]:
    def point(p: Point) -> dict[str, object]:
        return {
            "accuracy": p.accuracy,
            "false_approval_rate": p.false_approval,
            "false_approvals": p.false_approvals,
        }

    return {
        "target_false_approval": result.target,
        "current": point(result.before),
        "global": {"threshold": result.global_threshold, **point(result.global_point)},
        "per_intent": point(result.after),
        "thresholds": {
            name: {"current": result.current[name], "calibrated": new, "texts": texts}
            for (name, new), texts in zip(
                result.thresholds.items(), result.own_texts.values(), strict=True
            )
        },
        "written": [str(path) for path in written],
    }


def _table(rows: list[list[str]], header: list[str]) -> None:
    """Left-aligned columns; a row shorter than the header spans the rest."""
    if not rows:
        return
    full = [header, *(r for r in rows if len(r) == len(header))]
    widths = [max(len(click.unstyle(r[c])) for r in full) for c in range(len(header))]
    for row in [header, *rows]:
        cells = [cell + " " * (widths[c] - len(click.unstyle(cell))) for c, cell in enumerate(row)]
        line = "  ".join(cells).rstrip()
        click.echo(click.style(line, bold=True) if row is header else line)


def _clip(text: str) -> str:
    return text if len(text) <= TEXT_WIDTH else text[: TEXT_WIDTH - 1] + "…"
