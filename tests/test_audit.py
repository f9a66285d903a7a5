from __future__ import annotations

import json
import threading
from pathlib import Path

from railproxy.audit import AuditLog, key_id


def test_lines_are_whole_json_records_under_threads(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")

    def writer(n: int) -> None:
        for i in range(200):
            log.write({"request_id": f"{n}-{i}", "decision": "prompt"})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(records) == 800
    assert len({r["request_id"] for r in records}) == 800
    log.write({"after": "close"})  # ignored, never raises
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 800


def test_key_id_hides_the_key() -> None:
    assert key_id(None) is None
    ident = key_id("sk-secret-client-key")
    assert ident is not None and ident.startswith("key_") and "secret" not in ident
    assert ident == key_id("sk-secret-client-key") != key_id("sk-other")
