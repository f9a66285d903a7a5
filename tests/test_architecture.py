"""The core imports no web framework; the doors are thin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "railproxy"
CORE = [
    "atomic",
    "errors",
    "settings",
    "rails",
    "normalize",
    "embed",
    "index",
    "match",
    "decide",
    "guard",
    "evaluate",
]
FRAMEWORKS = {"fastapi", "starlette", "click", "uvicorn", "httpx"}


@pytest.mark.parametrize("module", CORE)
def test_core_imports_no_framework(module: str) -> None:
    tree = ast.parse((SRC / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FRAMEWORKS


def test_public_api_is_exported() -> None:
    import railproxy

    core = [name for name in railproxy.__all__ if name not in {"RailsMiddleware", "create_app"}]
    for name in core:
        assert getattr(railproxy, name).__module__.startswith("railproxy.")


def test_importing_railproxy_loads_no_web_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, railproxy; "
        "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'click') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
