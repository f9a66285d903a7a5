"""Text normalisation applied before anything is embedded.

Attackers hide words from a matcher with look-alike and invisible characters.
NFKC folds compatibility forms (full-width letters, ligatures); then every
character in the Unicode categories Cc (control), Cf (format: zero-width joiners,
bidi overrides, tag characters) and Co/Cs/Cn (private, surrogate, unassigned) is
removed, and runs of whitespace become one space.
"""

from __future__ import annotations

import re
import unicodedata

_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})
_KEEP_CONTROLS = frozenset("\t\n\r")  # whitespace, folded below rather than dropped
_SPACES = re.compile(r"\s+")


# ASCII is its own NFKC form, and its only characters in the dropped categories are
# the controls (Cc) other than tab, newline and carriage return.
_ASCII_DROPPED = {
    code: None
    for code in range(128)
    if chr(code) not in _KEEP_CONTROLS and unicodedata.category(chr(code)) in _DROP_CATEGORIES
}


def normalize(text: str) -> str:
    """Return `text` as the embedder sees it."""
    if text.isascii():  # most prompts: the same result without a per-character loop
        return _SPACES.sub(" ", text.translate(_ASCII_DROPPED)).strip()
    return _normalize_unicode(text)


def _normalize_unicode(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text)
    kept = "".join(
        ch
        for ch in folded
        if ch in _KEEP_CONTROLS or unicodedata.category(ch) not in _DROP_CATEGORIES
    )
    return _SPACES.sub(" ", kept).strip()
