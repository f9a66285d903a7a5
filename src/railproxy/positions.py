"""Where each intent's parts sit in its YAML file; threshold edits made there.

`load_rails` records one line per intent (`RailSet.sources`); the quality tools
want more: the line of every example and test utterance, and the exact text span
of a `threshold:` value so that `calibrate --write` can replace it without
touching the comments and layout around it. This module composes each intent
file with PyYAML's safe loader (nodes keep their marks) and maps intent names to
an `IntentLayout`. It reads the files (rails and enabled packs) that `load_rails`
already validated.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from railproxy.errors import RailsError
from railproxy.rails import RailSet, Source, load_rails


@dataclass(frozen=True, slots=True)
class IntentLayout:
    """Positions inside one intent's YAML mapping. Lines are 1-based, offsets 0-based."""

    path: Path
    line: int
    examples: tuple[int, ...]
    tests_match: tuple[int, ...]
    tests_no_match: tuple[int, ...]
    threshold_line: int | None
    threshold_span: tuple[int, int] | None  # character offsets of the value
    name_end: int  # character offset just past the `name` value
    key_column: int  # column where the intent's keys start
    flow: bool  # written as `{name: ..., ...}` on one line
    flow_end: int  # character offset of the closing `}` when flow

    def example(self, position: int) -> Source:
        return Source(self.path, _pick(self.examples, position, self.line))

    def test(self, kind: str, position: int) -> Source:
        lines = self.tests_match if kind == "match" else self.tests_no_match
        return Source(self.path, _pick(lines, position, self.line))

    @property
    def threshold_source(self) -> Source:
        return Source(self.path, self.threshold_line or self.line)


def locate(rails: RailSet) -> dict[str, IntentLayout]:
    """The layout of every intent of `rails`, by name. Intents whose file cannot be
    composed again (changed since loading) are simply absent."""
    layouts: dict[str, IntentLayout] = {}
    for path in dict.fromkeys(source.path for source in rails.sources.values()):
        try:
            node = yaml.compose(_read(path), Loader=yaml.SafeLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        for item in _sequence(_child(node, "intents")):
            name = _child(item, "name")
            if isinstance(item, yaml.MappingNode) and isinstance(name, yaml.ScalarNode):
                layouts.setdefault(str(name.value), _layout(path, item, name))
    return layouts


def editable(rails: RailSet, name: str) -> bool:
    """Whether intent `name` lives in the rails directory (not in a shipped pack)."""
    return rails.sources[name].path.parent == rails.root


def edit_thresholds(rails: RailSet, thresholds: Mapping[str, float]) -> dict[Path, str]:
    """The new text of every file where setting `thresholds` changes something.

    An existing value is replaced in place; otherwise a `threshold:` line is added
    under the intent's `name:` (inside the braces for a flow-style intent). Comments,
    quoting and line endings are kept.
    """
    layouts = locate(rails)
    missing = sorted(n for n in thresholds if n not in layouts or not editable(rails, n))
    if missing:
        raise RailsError(f"cannot edit intents {missing[:3]}: they are not in {rails.root}")
    edits: dict[Path, list[tuple[int, int, str]]] = {}
    for name, value in thresholds.items():
        layout = layouts[name]
        edits.setdefault(layout.path, []).append(_edit(layout, _read(layout.path), value))
    texts = {}
    for path, changes in edits.items():
        text = _read(path)
        for start, end, new in sorted(changes, reverse=True):
            text = text[:start] + new + text[end:]
        texts[path] = text
    return texts


def write_thresholds(rails: RailSet, thresholds: Mapping[str, float]) -> list[Path]:
    """`edit_thresholds`, written atomically. The rails must load again with exactly
    these thresholds, or every file is restored. Returns the files changed."""
    texts = edit_thresholds(rails, thresholds)
    originals = {path: path.read_bytes() for path in texts}
    try:
        for path, text in texts.items():
            _replace(path, text.encode("utf-8"))
        reloaded = load_rails(rails.root)
        for name, value in thresholds.items():
            if reloaded.by_name[name].threshold != round(value, 6):
                raise RailsError(f"intent {name!r}: threshold did not read back as {value}")
    except BaseException:
        for path, data in originals.items():
            _replace(path, data)
        raise
    return sorted(texts)


def _edit(layout: IntentLayout, text: str, value: float) -> tuple[int, int, str]:
    """(start, end, replacement) that sets one intent's threshold in `text`."""
    number = repr(round(value, 6))
    if layout.threshold_span is not None:
        return (*layout.threshold_span, number)
    if layout.flow:
        return (layout.flow_end, layout.flow_end, f", threshold: {number}")
    newline = "\r\n" if "\r\n" in text else "\n"
    end = text.find("\n", layout.name_end)
    if end < 0:
        end = len(text)
    elif text[end - 1] == "\r":
        end -= 1
    return (end, end, f"{newline}{' ' * layout.key_column}threshold: {number}")


def _read(path: Path) -> str:
    """The file's text with its line endings as they are (offsets match the bytes)."""
    return path.read_bytes().decode("utf-8")


def _replace(path: Path, data: bytes) -> None:
    """Write atomically, keeping the file's permissions."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), path.stat().st_mode & 0o777)
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _layout(path: Path, item: yaml.MappingNode, name: yaml.ScalarNode) -> IntentLayout:
    tests = _child(item, "tests")
    threshold = _child(item, "threshold")
    threshold_key = next((k for k, _ in item.value if k.value == "threshold"), None)
    return IntentLayout(
        path=path,
        line=_line(item),
        examples=tuple(_line(n) for n in _sequence(_child(item, "examples"))),
        tests_match=tuple(_line(n) for n in _sequence(_child(tests, "match"))),
        tests_no_match=tuple(_line(n) for n in _sequence(_child(tests, "no_match"))),
        threshold_line=_line(threshold_key) if threshold_key is not None else None,
        threshold_span=(
            (threshold.start_mark.index, threshold.end_mark.index)
            if threshold is not None
            else None
        ),
        name_end=name.end_mark.index,
        key_column=item.value[0][0].start_mark.column,
        flow=bool(item.flow_style),
        flow_end=item.end_mark.index - 1,
    )


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((value for k, value in node.value if k.value == key), None)


def _sequence(node: yaml.Node | None) -> list[yaml.Node]:
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _pick(lines: tuple[int, ...], position: int, fallback: int) -> int:
    return lines[position] if 0 <= position < len(lines) else fallback
