"""One JSON line per request: what was decided, for whom, and how it ended.

Records never hold the prompt unless the operator set `log_prompts`, and never
hold keys: the caller passes a client key *id* (a short hash), not the key.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, TextIO


def key_id(key: str | None) -> str | None:
    """A stable, non-reversible id for a client key (first 12 hex of its sha256)."""
    if not key:
        return None
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class AuditLog:
    """Append-only JSON-lines file; safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._handle: TextIO | None = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"ts": round(time.time(), 3), **record}, separators=(",", ":"))
        with self._lock:
            if self._handle is None:
                return
            self._handle.write(line + "\n")
            self._handle.flush()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
