"""Local answers: OpenAI-shaped completions, SSE chunks ending in [DONE], and errors."""

from __future__ import annotations

import json

import pytest

from railproxy.decide import Decision
from railproxy.respond import DONE, decision_answer, error, sse_error


def local(action: str, message: str = "No.") -> Decision:
    return Decision(
        action=action,  # type: ignore[arg-type]
        intent=None if action == "no_match" else "an_intent",
        score=0.7,
        threshold=0.6,
        neighbours=(),
        digest="d",
        message=message,
    )


@pytest.mark.parametrize("action", ["refuse", "reply", "no_match"])
def test_message_mode_answers_with_a_completion(action: str) -> None:
    answer = decision_answer(
        local(action), mode="message", stream=False, request_id="abc", created=5
    )
    assert answer.status == 200
    assert answer.headers == {"x-railproxy-decision": action}
    data = json.loads(answer.body)
    assert data["object"] == "chat.completion"
    assert data["id"] == "chatcmpl-rpabc"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "No.", "refusal": None}
    assert data["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("usage", [False, True], ids=["plain", "include-usage"])
def test_streamed_local_answer_ends_with_done(usage: bool) -> None:
    answer = decision_answer(
        local("refuse"), mode="message", stream=True, include_usage=usage, request_id="r"
    )
    assert answer.media_type == "text/event-stream"
    assert answer.body.endswith(DONE)
    events = [json.loads(e[6:]) for e in answer.body.split(b"\n\n") if e.startswith(b"data: {")]
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        == "No."
    )
    assert events[-1 if not usage else -2]["choices"][0]["finish_reason"] == "stop"
    assert ("usage" in events[-1] and events[-1]["choices"] == []) is usage


@pytest.mark.parametrize(
    ("action", "code"), [("refuse", "rail_refused"), ("no_match", "rail_no_match")]
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_error_mode_refusals_are_non_retryable_400s(action: str, code: str, stream: bool) -> None:
    answer = decision_answer(local(action), mode="error", stream=stream, request_id="r")
    assert answer.status == 400
    assert answer.headers == {"x-railproxy-decision": action, "x-should-retry": "false"}
    assert json.loads(answer.body) == {
        "error": {"message": "No.", "type": "invalid_request_error", "param": None, "code": code}
    }


def test_error_mode_reply_is_still_an_answer() -> None:
    answer = decision_answer(local("reply", "Hi!"), mode="error", stream=False, request_id="r")
    assert answer.status == 200
    assert json.loads(answer.body)["choices"][0]["message"]["content"] == "Hi!"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (429, "rate_limit_error"),
        (502, "server_error"),
    ],
)
def test_error_bodies_have_the_openai_shape(status: int, kind: str) -> None:
    answer = error(status, "what went wrong", code="c", param="p")
    assert json.loads(answer.body) == {
        "error": {"message": "what went wrong", "type": kind, "param": "p", "code": "c"}
    }


def test_sse_error_event() -> None:
    event = sse_error("broke", code="upstream_stream_error")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["code"] == "upstream_stream_error"


def test_an_approved_decision_is_not_answered_locally() -> None:
    with pytest.raises(ValueError, match="upstream"):
        decision_answer(local("prompt"), mode="message", stream=False, request_id="r")
