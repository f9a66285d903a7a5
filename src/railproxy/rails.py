"""Rails: a directory of YAML files -> a validated, immutable `RailSet`.

`config.yaml` (optional) holds settings; every other `*.yaml`/`*.yml` file holds
`intents:`. YAML is read with PyYAML's safe loader only, so tags such as
`!!python/object` are errors, never code. Anchors/aliases are refused (they can
expand exponentially), duplicate keys are errors, and every mistake is reported
as `file:line: intent 'name': what is wrong`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from railproxy.errors import RailsError
from railproxy.settings import ServerConfig

Action = Literal["prompt", "refuse", "reply"]
USER_TEXT = "{user_text}"
# Chosen on CLINC150 (bench/clinc.py, bench/decision_rules.py): with the centroid
# rule 0.45 gives 0.80 in-scope accuracy at 0.92 out-of-scope recall, and with the
# safety pack 0% of the public attack prompts approved.
DEFAULT_THRESHOLD = 0.45
CONFIG_NAMES = ("config.yaml", "config.yml")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(min_length=1)


class IntentTests(BaseModel):
    """Utterances that must (and must not) be matched to the intent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: tuple[str, ...] = ()
    no_match: tuple[str, ...] = ()


class Intent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    examples: tuple[str, ...] = Field(min_length=1)
    threshold: float | None = Field(None, ge=-1.0, le=1.0)
    prompt: str | tuple[Message, ...] | None = None
    refuse: str | None = None
    reply: str | None = None
    pass_user_text: bool = False
    model: str | None = None
    tests: IntentTests = IntentTests()

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("names use letters, digits, '_', '.' or '-' (at most 100)")
        return value

    @field_validator("examples")
    @classmethod
    def _check_examples(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for example in value:
            if not example.strip():
                raise ValueError("examples must not be empty strings")
        return value

    @model_validator(mode="after")
    def _check_action(self) -> Intent:
        given = [key for key in ("prompt", "refuse", "reply") if getattr(self, key) is not None]
        if len(given) != 1:
            found = ", ".join(given) or "none"
            raise ValueError(f"needs exactly one of prompt, refuse, reply (found: {found})")
        if self.prompt is None and (self.pass_user_text or self.model):
            raise ValueError("pass_user_text and model only apply to a prompt intent")
        if isinstance(self.prompt, tuple) and not self.prompt:
            raise ValueError("prompt must be a string or a non-empty list of messages")
        uses_user_text = any(USER_TEXT in text for text in self.prompt_texts())
        if uses_user_text and not self.pass_user_text:
            raise ValueError(
                f"prompt uses {USER_TEXT} but pass_user_text is not true; "
                "set pass_user_text: true to let user text reach the upstream"
            )
        if self.pass_user_text and not uses_user_text:
            raise ValueError(f"pass_user_text is true but the prompt has no {USER_TEXT}")
        return self

    @property
    def action(self) -> Action:
        if self.prompt is not None:
            return "prompt"
        return "refuse" if self.refuse is not None else "reply"

    def prompt_texts(self) -> list[str]:
        if self.prompt is None:
            return []
        if isinstance(self.prompt, str):
            return [self.prompt]
        return [message.content for message in self.prompt]

    def messages(self, user_text: str | None = None) -> list[dict[str, str]]:
        """The messages sent upstream; `user_text` is used only if the rail opted in."""
        if self.prompt is None:
            raise ValueError(f"intent {self.name!r} has no prompt")
        # Plain pairs, not Message models: this runs on every approved request.
        raw = (
            [("user", self.prompt)]
            if isinstance(self.prompt, str)
            else [(message.role, message.content) for message in self.prompt]
        )
        substitute = self.pass_user_text and user_text is not None
        return [
            {
                "role": role,
                # str.replace, not str.format: operator text may contain braces.
                "content": content.replace(USER_TEXT, user_text)
                if substitute and user_text is not None
                else content,
            }
            for role, content in raw
        ]


class RailsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    threshold: float = Field(DEFAULT_THRESHOLD, ge=-1.0, le=1.0)
    refusal: Literal["message", "error"] = "message"
    no_match: str = Field("Sorry, I can't help with that.", min_length=1)
    upstream_model: str = Field("gpt-4o-mini", min_length=1)
    packs: tuple[str, ...] = ()  # intent packs shipped with railproxy, e.g. [safety]
    server: ServerConfig = ServerConfig()

    @field_validator("packs")
    @classmethod
    def _check_packs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = sorted(p.stem for p in pack_files())
        for name in value:
            if name not in known:
                raise ValueError(f"unknown pack {name!r} (available: {', '.join(known)})")
        return value


class _IntentFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intents: list[Intent]


@dataclass(frozen=True, slots=True)
class Source:
    """Where an intent was defined."""

    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class RailSet:
    root: Path
    config: RailsConfig
    intents: tuple[Intent, ...]
    sources: dict[str, Source] = field(repr=False)
    digest: str

    @cached_property
    def by_name(self) -> dict[str, Intent]:
        return {intent.name: intent for intent in self.intents}

    @cached_property
    def refusals(self) -> frozenset[str]:
        """Names of the intents that refuse."""
        return frozenset(intent.name for intent in self.intents if intent.action == "refuse")

    def threshold(self, intent: Intent) -> float:
        return self.config.threshold if intent.threshold is None else intent.threshold

    def upstream_model(self, intent: Intent) -> str:
        return intent.model or self.config.upstream_model

    def upstream_models(self) -> list[str]:
        """Every model id the rails can send upstream, for GET /v1/models."""
        models = {self.upstream_model(i) for i in self.intents if i.action == "prompt"}
        return sorted(models or {self.config.upstream_model})

    def examples(self) -> Iterator[tuple[Intent, str]]:
        for intent in self.intents:
            for example in intent.examples:
                yield intent, example


PACKS_DIR = Path(__file__).parent / "packs"


def pack_files() -> list[Path]:
    """Intent packs shipped with railproxy (railproxy/packs/*.yaml)."""
    return sorted(PACKS_DIR.glob("*.yaml"))


def rail_files(root: Path) -> list[Path]:
    """The YAML files of a rails directory, in a stable order (hidden files skipped)."""
    files = [
        path
        for pattern in ("*.yaml", "*.yml")
        for path in root.glob(pattern)
        if path.is_file() and not path.name.startswith(".")
    ]
    return sorted(files, key=lambda path: path.name)


def rails_digest(root: Path) -> str:
    """sha256 over every rails file's name and bytes: any edit changes it.

    The shipped packs are included too, so upgrading railproxy to a release with
    different pack intents marks the index stale instead of serving it.
    """
    digest = hashlib.sha256(b"railproxy-rails-v1\0")
    labelled = [(p.name, p) for p in rail_files(root)]
    labelled += [(f"pack:{p.name}", p) for p in pack_files()]
    for label, path in labelled:
        data = _read_bytes(path)
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def load_rails(root: Path | str) -> RailSet:
    """Read and validate a rails directory. Raises `RailsError` naming file and line."""
    root = Path(root)
    if not root.is_dir():
        raise RailsError(f"{root}: not a directory")
    config = RailsConfig()
    intents: list[Intent] = []
    sources: dict[str, Source] = {}
    problems: list[str] = []
    intent_files = []
    for path in rail_files(root):
        try:
            data, node = _read_yaml(path)
        except RailsError as exc:
            problems.append(str(exc))
            continue
        if path.name in CONFIG_NAMES:
            try:
                config = RailsConfig.model_validate(data if data is not None else {})
            except ValidationError as exc:
                problems.extend(_describe(exc, path, node, data))
        else:
            intent_files.append((path, data, node))
    for pack in config.packs:
        path = PACKS_DIR / f"{pack}.yaml"
        data, node = _read_yaml(path)
        intent_files.append((path, data, node))
    for path, data, node in intent_files:
        try:
            parsed = _IntentFile.model_validate(data)
        except ValidationError as exc:
            problems.extend(_describe(exc, path, node, data))
            continue
        for position, intent in enumerate(parsed.intents):
            line = _line_of(node, ("intents", position))
            if intent.name in sources:
                problems.append(
                    f"{path}:{line}: intent {intent.name!r}: duplicate name "
                    f"(first defined at {sources[intent.name]})"
                )
                continue
            sources[intent.name] = Source(path, line)
            intents.append(intent)
    if not problems and not intents:
        problems.append(f"{root}: no intents found (add a YAML file with an 'intents:' list)")
    if problems:
        raise RailsError("\n".join(problems))
    return RailSet(
        root=root,
        config=config,
        intents=tuple(intents),
        sources=sources,
        digest=rails_digest(root),
    )


def _read_bytes(path: Path) -> bytes:
    """A rails file's bytes; an unreadable file is a RailsError naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RailsError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RailsError(f"{path}:{line}: not valid UTF-8 (byte {exc.start})") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_node(path, node, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or str(exc)
        raise RailsError(f"{path}:{line}: invalid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise RailsError(f"{path}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    return data, node


def _check_node(path: Path, node: yaml.Node, seen: set[int]) -> None:
    """Refuse aliases (a node reached twice) and duplicate mapping keys."""
    if id(node) in seen:
        raise RailsError(f"{path}:{node.start_mark.line + 1}: YAML aliases are not supported")
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in keys:
                    raise RailsError(
                        f"{path}:{key.start_mark.line + 1}: duplicate key {key.value!r}"
                    )
                keys.add(key.value)
            _check_node(path, key, seen)
            _check_node(path, value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_node(path, item, seen)


def _line_of(node: yaml.Node | None, loc: Sequence[int | str]) -> int:
    """The 1-based line of the deepest node along a pydantic error location."""
    if node is None:
        return 1
    current = node
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(current, yaml.MappingNode) and isinstance(part, str):
            child = next((v for k, v in current.value if k.value == part), None)
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int):
            child = current.value[part] if 0 <= part < len(current.value) else None
        if child is None:
            break
        current = child
    return int(current.start_mark.line) + 1


def _describe(exc: ValidationError, path: Path, node: yaml.Node | None, data: Any) -> list[str]:
    problems = []
    for error in exc.errors():
        loc = [part for part in error["loc"] if isinstance(part, (int, str))]
        # pydantic adds union-branch names ("str", "tuple[...]") to loc; drop them.
        loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str"}))]
        where = f"{path}:{_line_of(node, loc)}"
        intent = _intent_name(data, loc)
        field_path = ".".join(str(p) for p in loc[2:] if not isinstance(p, int)) if intent else ""
        if not intent:
            field_path = ".".join(str(p) for p in loc)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key {str(loc[-1])!r}"
            field_path = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
            if intent:
                field_path = ".".join(str(p) for p in loc[2:-1] if not isinstance(p, int))
        prefix = f"intent {intent!r}: " if intent else ""
        subject = f"{field_path}: " if field_path else ""
        problems.append(f"{where}: {prefix}{subject}{message}")
    return problems


def _intent_name(data: Any, loc: Sequence[int | str]) -> str | None:
    if len(loc) >= 2 and loc[0] == "intents" and isinstance(loc[1], int):
        try:
            name = data["intents"][loc[1]].get("name")
        except (TypeError, KeyError, IndexError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    return None
