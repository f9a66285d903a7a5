"""Shared fixtures: one real embedder per session, and rails directories on disk."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from railproxy.embed import SentenceTransformerEmbedder
from railproxy.index import build_index
from railproxy.rails import load_rails

# A small rails set used across the suite: one of each action, plus an opt-in rail.
SUPPORT_RAILS = {
    "config.yaml": """\
        threshold: 0.6
        no_match: Sorry, I can only help with ACME billing.
        upstream_model: gpt-4o-mini
        """,
    "billing.yaml": """\
        intents:
          - name: refund_status
            examples:
              - where is my refund
              - has my refund been processed yet
              - when will I get my money back
            prompt: |
              Explain how an ACME customer checks the status of a refund in the web portal.
          - name: medical_advice
            examples:
              - what medicine should I take for a headache
              - can you diagnose my rash
            refuse: I can't give medical advice.
          - name: greeting
            examples: [hi, hello there, good morning]
            reply: Hi! I can help with ACME billing questions.
          - name: translate_to_french
            examples: [translate this to french, how do you say this in french]
            pass_user_text: true
            model: gpt-4o
            prompt:
              - role: system
                content: You translate short texts into French.
              - role: user
                content: "Translate into French: {user_text}"
        """,
}

RailsFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    """The real all-MiniLM-L6-v2, loaded once for the whole run."""
    return SentenceTransformerEmbedder()


def write_rails(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return root


@pytest.fixture
def make_rails(tmp_path: Path, embedder: SentenceTransformerEmbedder) -> RailsFactory:
    """Write a rails directory (default: SUPPORT_RAILS) and index it with the real model."""

    def make(
        files: dict[str, str] | None = None, *, name: str = "rails", index: bool = True
    ) -> Path:
        root = write_rails(tmp_path / name, SUPPORT_RAILS if files is None else files)
        if index:
            build_index(load_rails(root), embedder)
        return root

    return make
