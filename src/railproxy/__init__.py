"""railproxy: a guardrails proxy for LLM APIs.

Only prompts your rails approve reach the model. The core (`Guard`, `Decision`,
`load_rails`, `build_index`) imports no web framework; `RailsMiddleware` and
`create_app` load FastAPI/Starlette only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from railproxy.decide import Decision
from railproxy.errors import (
    CorruptIndex,
    GuardUnavailable,
    IndexNotFound,
    IndexProblem,
    InputError,
    InputTooLong,
    RailproxyError,
    RailsError,
    StaleIndex,
    UpstreamError,
)
from railproxy.guard import Guard
from railproxy.index import build_index, load_index
from railproxy.match import Match
from railproxy.rails import RailSet, load_rails

if TYPE_CHECKING:
    from railproxy.middleware import RailsMiddleware
    from railproxy.proxy import create_app

__all__ = [
    "CorruptIndex",
    "Decision",
    "Guard",
    "GuardUnavailable",
    "IndexNotFound",
    "IndexProblem",
    "InputError",
    "InputTooLong",
    "Match",
    "RailSet",
    "RailproxyError",
    "RailsError",
    "RailsMiddleware",
    "StaleIndex",
    "UpstreamError",
    "build_index",
    "create_app",
    "load_index",
    "load_rails",
]

_LAZY = {"RailsMiddleware": "railproxy.middleware", "create_app": "railproxy.proxy"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'railproxy' has no attribute {name!r}")
