"""`check_headers`: what is refused before a body is read (the middleware meets raw headers)."""

from __future__ import annotations

import pytest

from railproxy.intake import Rejected, check_headers

JSON = (b"content-type", b"application/json")


@pytest.mark.parametrize(
    "length",
    [b"\xb2", b"\xb9\xb2", b"1_000", b"-5", b""],
    ids=["superscript-2", "superscripts", "underscore", "negative", "empty"],
)
def test_a_content_length_that_is_not_ascii_digits_is_left_to_the_body_limit(
    length: bytes,
) -> None:
    check_headers([JSON, (b"content-length", length)], max_bytes=10)  # no ValueError, no 500


def test_a_declared_length_over_the_limit_is_413() -> None:
    with pytest.raises(Rejected) as caught:
        check_headers([JSON, (b"content-length", b"11")], max_bytes=10)
    assert caught.value.answer.status == 413
