"""Reindexing: incremental, atomic, and strict about what it loads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from railproxy.embed import Embedder, Vectors
from railproxy.errors import CorruptIndex, IndexNotFound, StaleIndex
from railproxy.index import MANIFEST, build_index, index_dir, load_index
from railproxy.rails import load_rails
from tests.conftest import SUPPORT_RAILS, write_rails


class CountingEmbedder:
    """Wraps the real embedder at the model seam and records what it was asked to embed."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.seen: list[str] = []
        self.name = inner.name
        self.dimension = inner.dimension
        self.max_tokens = inner.max_tokens

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.seen.extend(texts)
        return self.inner.embed(texts)


def snapshot_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(index_dir(root).iterdir())}


def test_reindex_is_incremental(tmp_path: Path, embedder: Embedder) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    counting = CountingEmbedder(embedder)
    first = build_index(load_rails(root), counting)
    assert first.embedded == first.examples == 10
    assert len(counting.seen) == 10

    counting.seen.clear()
    second = build_index(load_rails(root), counting)
    assert (second.embedded, counting.seen) == (0, [])

    billing = root / "billing.yaml"
    billing.write_text(billing.read_text().replace("where is my refund", "where's my refund"))
    third = build_index(load_rails(root), counting)
    assert third.embedded == 1
    assert counting.seen == ["where's my refund"]
    index = load_index(root)
    assert [e.text for e in index.entries].count("where's my refund") == 1


def test_reused_vectors_equal_fresh_ones(tmp_path: Path, embedder: Embedder) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    build_index(load_rails(root), embedder)
    (root / "config.yaml").write_text("threshold: 0.65\n")
    build_index(load_rails(root), embedder)  # all reused
    index = load_index(root)
    fresh = embedder.embed([e.key for e in index.entries])
    np.testing.assert_allclose(index.vectors(), fresh, atol=1e-6)


def test_failed_validation_leaves_index_byte_identical(tmp_path: Path, embedder: Embedder) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    build_index(load_rails(root), embedder)
    before = snapshot_files(root)
    (root / "broken.yaml").write_text("intents:\n  - name: x\n    examples: [a]\n")
    with pytest.raises(Exception, match=r"broken\.yaml:2"):
        build_index(load_rails(root), embedder)
    assert snapshot_files(root) == before


def test_missing_index(tmp_path: Path) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    with pytest.raises(IndexNotFound, match="run: railproxy reindex"):
        load_index(root)


def test_stale_index(tmp_path: Path, embedder: Embedder) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    build_index(load_rails(root), embedder)
    (root / "config.yaml").write_text("threshold: 0.7\n")
    with pytest.raises(StaleIndex, match="changed since indexing"):
        load_index(root)


def test_model_mismatch(tmp_path: Path, embedder: Embedder) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    build_index(load_rails(root), embedder)
    with pytest.raises(StaleIndex, match="indexed with model"):
        load_index(root, model="some-other-model")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: (d / MANIFEST).write_text("{not json"), id="manifest-not-json"),
        pytest.param(lambda d: (d / MANIFEST).write_text('{"format": 1}'), id="manifest-fields"),
        pytest.param(
            lambda d: next(d.glob("vectors-*.faiss")).write_bytes(b"garbage"), id="vectors-garbage"
        ),
        pytest.param(lambda d: next(d.glob("vectors-*.faiss")).unlink(), id="vectors-missing"),
    ],
)
def test_corrupt_index(tmp_path: Path, embedder: Embedder, damage: object) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    build_index(load_rails(root), embedder)
    damage(index_dir(root))  # type: ignore[operator]
    with pytest.raises(CorruptIndex, match="run: railproxy reindex"):
        load_index(root)


def test_manifest_maps_ids_to_intents(tmp_path: Path, embedder: Embedder) -> None:
    root = write_rails(tmp_path, SUPPORT_RAILS)
    build_index(load_rails(root), embedder)
    manifest = json.loads((index_dir(root) / MANIFEST).read_text())
    assert manifest["model"] == "all-MiniLM-L6-v2"
    assert manifest["dimension"] == 384
    assert manifest["digest"] == load_rails(root).digest
    assert manifest["examples"][0] == {
        "intent": "refund_status",
        "text": "where is my refund",
        "key": "where is my refund",
    }
    assert len(list(index_dir(root).glob("vectors-*.faiss"))) == 1
