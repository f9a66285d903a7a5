"""The command line: parse -> core -> echo. Domain errors become ClickExceptions."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from railproxy.decide import Decision
from railproxy.errors import RailproxyError

P = ParamSpec("P")
R = TypeVar("R")

RAILS_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
DATA_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def domain_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a RailproxyError into a one-line, non-zero exit."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except RailproxyError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.group()
@click.version_option(package_name="railproxy")
def cli() -> None:
    """railproxy: only prompts your rails approve reach the LLM."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("sentence_transformers", "transformers", "httpx", "faiss"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def main() -> None:
    cli()


@cli.command()
@click.argument("rails_dir", type=RAILS_DIR)
@domain_errors
def reindex(rails_dir: Path) -> None:
    """Validate RAILS_DIR, embed its examples and write RAILS_DIR/.index.

    Examples whose text and model are unchanged reuse their stored vectors.
    """
    from railproxy.embed import make_embedder
    from railproxy.index import build_index, count_to_embed
    from railproxy.rails import load_rails

    rails = load_rails(rails_dir)
    embedder = make_embedder(rails.config.model)
    todo = count_to_embed(rails, embedder)
    with click.progressbar(length=todo, label="Embedding", file=sys.stderr) as bar:
        report = build_index(rails, embedder, progress=bar.update)
    click.echo(
        f"Indexed {report.examples} examples in {report.intents} intents "
        f"({report.embedded} embedded, {report.reused} reused) -> {report.path}"
    )


@cli.command()
@click.argument("rails_dir", type=RAILS_DIR)
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.option("--top", default=5, show_default=True, help="Neighbours to show.")
@domain_errors
def match(rails_dir: Path, text: str, as_json: bool, top: int) -> None:
    """Show the decision for TEXT, with its nearest examples."""
    with _guard(rails_dir) as guard:
        decision = guard.check(text)
    if as_json:
        click.echo(json.dumps(decision_json(decision, top), indent=2))
        return
    verdict = (
        decision.action if decision.intent is None else f"{decision.action} ({decision.intent})"
    )
    click.echo(
        f"decision: {verdict}  score {decision.score:.3f}  threshold {decision.threshold:.3f}"
    )
    if decision.message:
        click.echo(f"answer:   {decision.message}")
    for message in decision.upstream_messages:
        click.echo(f"upstream: [{message['role']}] {message['content'].strip()}")
    click.echo("nearest examples:")
    for m in decision.neighbours[:top]:
        click.echo(f"  {m.score:6.3f}  {m.intent:<28} {m.example}")


@cli.command(name="eval")
@click.argument("rails_dir", type=RAILS_DIR)
@click.argument("data", type=DATA_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--top", default=10, show_default=True, help="Confusions to list.")
@domain_errors
def eval_command(rails_dir: Path, data: Path, as_json: bool, top: int) -> None:
    """Score the labelled JSONL file DATA against RAILS_DIR.

    Lines are {"text": ..., "intent": NAME or null}; null means "must not be approved".
    """
    from railproxy.evaluate import evaluate, read_examples

    examples = read_examples(data)
    sweep = [round(0.30 + 0.025 * i, 3) for i in range(25)]
    with _guard(rails_dir) as guard:
        report = evaluate(guard, examples, thresholds=sweep)
    if as_json:
        click.echo(json.dumps(report.as_dict(top), indent=2))
        return
    click.echo(f"in-scope accuracy     {report.accuracy:.3f}  ({report.correct}/{report.in_scope})")
    click.echo(
        f"out-of-scope recall   {report.oos_recall:.3f}  ({report.rejected}/{report.out_of_scope})"
    )
    click.echo(f"false approvals       {len(report.false_approvals)}")
    for text, intent in report.false_approvals[:top]:
        click.echo(f"  {intent:<28} {text}")
    if report.confusions:
        click.echo("most confused (expected -> got):")
        for (expected, got), count in report.confusions.most_common(top):
            click.echo(f"  {count:4d}  {expected} -> {got}")
    click.echo("threshold sweep (one global threshold):")
    click.echo("  threshold  accuracy  oos_recall")
    for point in report.sweep:
        click.echo(
            f"  {point['threshold']:9.3f}  {point['accuracy']:8.3f}  {point['oos_recall']:10.3f}"
        )


def decision_json(decision: Decision, top: int = 5) -> dict[str, Any]:
    return {
        "action": decision.action,
        "intent": decision.intent,
        "score": round(decision.score, 6),
        "threshold": decision.threshold,
        "message": decision.message,
        "upstream_model": decision.upstream_model,
        "upstream_messages": [dict(m) for m in decision.upstream_messages],
        "neighbours": [
            {"intent": m.intent, "example": m.example, "score": round(m.score, 6)}
            for m in decision.neighbours[:top]
        ],
        "digest": decision.digest,
    }


@contextmanager
def _guard(rails_dir: Path) -> Iterator[Any]:
    from railproxy.guard import Guard

    yield Guard(rails_dir)


def _register(module: str, *names: str) -> None:
    """Add commands that live beside their subject (serve in serve.py, ...)."""
    import importlib

    try:
        loaded = importlib.import_module(f"railproxy.{module}")
    except ImportError:  # pragma: no cover - only while a door is being built
        return
    for name in names:
        cli.add_command(getattr(loaded, name))


_register("serve", "serve")
_register("quality_cli", "test_command", "lint", "calibrate")
