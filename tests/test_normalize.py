from __future__ import annotations

import pytest

from railproxy.normalize import _normalize_unicode, normalize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("where is my refund", "where is my refund", id="plain"),
        pytest.param("\uff57\uff48\uff45\uff52\uff45 \uff49\uff53", "where is", id="full-width"),
        pytest.param("re\u200bfund", "refund", id="zero-width-space"),
        pytest.param("re\u200dfu\u2060nd", "refund", id="joiners"),
        pytest.param("\u202eevil\u202c text", "evil text", id="bidi-override"),
        pytest.param("hi\U000e0069\U000e0067\U000e006e", "hi", id="unicode-tags"),
        pytest.param("a\x00b\x07c", "abc", id="controls"),
        pytest.param("  many \t\n spaces  ", "many spaces", id="whitespace"),
        pytest.param("\ufb01le", "file", id="ligature"),
        pytest.param("\u200b\u200c", "", id="only-invisible"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


def test_the_ascii_fast_path_equals_the_general_one() -> None:
    """Every ASCII character, alone and between words, the way the full rule treats it."""
    for code in range(128):
        for text in (chr(code), f"re{chr(code)}fund", f" {chr(code)} x {chr(code)}"):
            assert normalize(text) == _normalize_unicode(text), repr(text)
    every = "".join(chr(code) for code in range(128)) * 3
    assert normalize(every) == _normalize_unicode(every)
