"""The intent index: every example's vector in FAISS, plus a JSON manifest.

Layout inside the rails directory:

    .index/manifest.json          model, dimension, rails digest, id -> intent map
    .index/vectors-<sha12>.faiss  IndexFlatIP over normalised vectors (inner product = cosine)

Writes are atomic: the vectors file gets a content-addressed name, then
`manifest.json` is replaced in one `os.replace`. A reader always sees a complete
old or a complete new index; the manifest pins the vectors file's sha256. No
pickle anywhere: FAISS's own format and JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from railproxy.atomic import write_atomically
from railproxy.embed import Embedder, Vectors
from railproxy.errors import CorruptIndex, IndexNotFound, StaleIndex
from railproxy.normalize import normalize
from railproxy.rails import RailSet, rails_digest

INDEX_DIR = ".index"
MANIFEST = "manifest.json"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class Entry:
    intent: str
    text: str  # the example as written in the rails
    key: str  # normalised text: what was embedded


@dataclass(frozen=True)
class IntentIndex:
    """A loaded index: FAISS vectors and what each row means."""

    model: str
    dimension: int
    digest: str
    entries: tuple[Entry, ...]
    faiss_index: Any
    manifest_path: Path

    @cached_property
    def intents(self) -> tuple[str, ...]:
        """Intent names in first-seen order; row i of `centroids` is intent i."""
        return tuple(dict.fromkeys(entry.intent for entry in self.entries))

    @cached_property
    def centroids(self) -> Vectors:
        """Each intent's normalised mean example vector, one row per intent."""
        vectors = self.vectors()
        row = {name: i for i, name in enumerate(self.intents)}
        sums = np.zeros((len(self.intents), self.dimension), dtype=np.float64)
        np.add.at(sums, [row[e.intent] for e in self.entries], vectors)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        if not np.all(norms > 0):
            raise CorruptIndex("an intent's examples cancel out; its centroid is undefined")
        return np.ascontiguousarray(sums / norms, dtype=np.float32)

    def vectors(self) -> Vectors:
        """All vectors, row i for entry i."""
        count = len(self.entries)
        out = np.asarray(self.faiss_index.reconstruct_n(0, count), dtype=np.float32)
        return out.reshape(count, self.dimension)

    def search(self, query: Vectors, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k nearest examples for each query row."""
        k = max(1, min(k, len(self.entries)))
        scores, ids = self.faiss_index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return scores, ids


@dataclass(frozen=True, slots=True)
class BuildReport:
    path: Path
    examples: int
    intents: int
    embedded: int  # newly embedded; the rest came from the previous index
    reused: int


def index_dir(root: Path) -> Path:
    return root / INDEX_DIR


def build_index(
    rails: RailSet,
    embedder: Embedder,
    *,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Embed every example (reusing the previous index's vectors) and write the index."""
    entries = [
        Entry(intent=intent.name, text=example, key=normalize(example))
        for intent, example in rails.examples()
    ]
    for entry in entries:
        if not entry.key:
            raise CorruptIndex(f"intent {entry.intent!r}: example {entry.text!r} is empty")
    cached = _previous_vectors(rails.root, embedder)
    todo = sorted({entry.key for entry in entries if entry.key not in cached})
    fresh: dict[str, np.ndarray] = {}
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        vectors = embedder.embed(batch)
        _check_vectors(vectors, len(batch), embedder.dimension)
        fresh.update(zip(batch, vectors, strict=True))
        if progress is not None:
            progress(len(batch))
    matrix = np.stack([fresh[e.key] if e.key in fresh else cached[e.key] for e in entries])
    path = write_index(rails.root, embedder, entries, matrix, digest=rails.digest)
    return BuildReport(
        path=path,
        examples=len(entries),
        intents=len(rails.intents),
        embedded=len(todo),
        reused=len({e.key for e in entries}) - len(todo),
    )


def count_to_embed(rails: RailSet, embedder: Embedder) -> int:
    """How many distinct examples `build_index` would embed now."""
    cached = _previous_vectors(rails.root, embedder)
    return len({normalize(example) for _, example in rails.examples()} - cached.keys())


def write_index(
    root: Path, embedder: Embedder, entries: Sequence[Entry], matrix: Vectors, *, digest: str
) -> Path:
    folder = index_dir(root)
    folder.mkdir(exist_ok=True)
    index = faiss.IndexFlatIP(embedder.dimension)
    index.add(np.ascontiguousarray(matrix, dtype=np.float32))
    data = faiss.serialize_index(index).tobytes()
    sha = hashlib.sha256(data).hexdigest()
    vectors_name = f"vectors-{sha[:12]}.faiss"
    write_atomically(folder / vectors_name, data)
    manifest = {
        "format": FORMAT,
        "model": embedder.name,
        "dimension": embedder.dimension,
        "digest": digest,
        "vectors": vectors_name,
        "vectors_sha256": sha,
        "count": len(entries),
        "examples": [{"intent": e.intent, "text": e.text, "key": e.key} for e in entries],
    }
    manifest_path = folder / MANIFEST
    write_atomically(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    for stale in folder.glob("vectors-*.faiss"):
        if stale.name != vectors_name:
            stale.unlink(missing_ok=True)
    return manifest_path


def load_index(root: Path, *, model: str | None = None, check_digest: bool = True) -> IntentIndex:
    """Load and verify the index of a rails directory.

    Raises IndexNotFound, CorruptIndex or StaleIndex with the command that fixes it.
    """
    fix = f"run: railproxy reindex {root}"
    manifest_path = index_dir(root) / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except FileNotFoundError as exc:
        raise IndexNotFound(f"no index in {index_dir(root)} — {fix}") from exc
    except (OSError, ValueError) as exc:
        raise CorruptIndex(f"{manifest_path} is unreadable ({exc}) — {fix}") from exc
    try:
        if manifest["format"] != FORMAT:
            raise CorruptIndex(f"{manifest_path} has format {manifest['format']!r} — {fix}")
        entries = tuple(
            Entry(intent=str(e["intent"]), text=str(e["text"]), key=str(e["key"]))
            for e in manifest["examples"]
        )
        dimension = int(manifest["dimension"])
        vectors_path = index_dir(root) / str(manifest["vectors"])
        expected_sha = str(manifest["vectors_sha256"])
        manifest_model = str(manifest["model"])
        digest = str(manifest["digest"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptIndex(f"{manifest_path} is malformed ({exc!r}) — {fix}") from exc
    if "/" in vectors_path.name or vectors_path.parent != index_dir(root):
        raise CorruptIndex(f"{manifest_path} names an unexpected file — {fix}")
    try:
        data = vectors_path.read_bytes()
    except OSError as exc:
        raise CorruptIndex(f"{vectors_path} is missing or unreadable — {fix}") from exc
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise CorruptIndex(f"{vectors_path} does not match its manifest — {fix}")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise CorruptIndex(f"{vectors_path} is not a FAISS index — {fix}") from exc
    if index.ntotal != len(entries) or index.d != dimension or not entries:
        raise CorruptIndex(f"{vectors_path} disagrees with {manifest_path} — {fix}")
    if model is not None and model != manifest_model:
        raise StaleIndex(f"{root} was indexed with model {manifest_model!r}, not {model!r} — {fix}")
    if check_digest:
        current = rails_digest(root)
        if current != digest:
            raise StaleIndex(
                f"{root} changed since indexing ({current[:8]} ≠ {digest[:8]}) — {fix}"
            )
    return IntentIndex(
        model=manifest_model,
        dimension=dimension,
        digest=digest,
        entries=entries,
        faiss_index=index,
        manifest_path=manifest_path,
    )


def _previous_vectors(root: Path, embedder: Embedder) -> dict[str, np.ndarray]:
    """Vectors of the last index built with the same model, by normalised text."""
    try:
        previous = load_index(root, check_digest=False)
    except (IndexNotFound, CorruptIndex, StaleIndex):
        return {}
    if previous.model != embedder.name or previous.dimension != embedder.dimension:
        return {}
    vectors = previous.vectors()
    return {entry.key: vectors[i] for i, entry in enumerate(previous.entries)}


def _check_vectors(vectors: Vectors, count: int, dimension: int) -> None:
    if vectors.shape != (count, dimension) or not np.all(np.isfinite(vectors)):
        raise CorruptIndex(f"the model returned unusable vectors (shape {vectors.shape})")
