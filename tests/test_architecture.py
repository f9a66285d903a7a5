"""The core imports no web framework; the doors are thin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parent.parent / "src" / "railproxy"
CORE = [
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
