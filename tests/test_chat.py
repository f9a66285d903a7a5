"""Strict parsing of Chat Completions bodies, and the upstream body rebuilt from scratch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from railproxy import respond
from railproxy.chat import (
    IGNORED,
    UNSUPPORTED,
    BadRequest,
    ChatRequest,
    parse_chat_request,
    upstream_body,
)
from railproxy.decide import Decision
from railproxy.settings import ServerConfig

LIMITS = ServerConfig(max_input_chars=200, max_tokens_cap=500)
USER = [{"role": "user", "content": "where is my refund"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "gpt-x", "messages": USER, **fields}).encode()


def approved(*messages: dict[str, str], model: str = "gpt-4o-mini") -> Decision:
    return Decision(
        action="prompt",
        intent="refund_status",
        score=0.9,
        threshold=0.6,
        neighbours=(),
        digest="d" * 64,
        upstream_messages=messages or ({"role": "user", "content": "RAIL PROMPT"},),
        upstream_model=model,
    )


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (body(), "where is my refund"),
        (
            body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    }
                ]
            ),
            "a\nb",
        ),
        (
            body(
                messages=[
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": None, "tool_calls": []},
                    *USER,
                ]
            ),
            "where is my refund",
        ),
        (body(messages=[{"role": "user", "content": "hi", "name": "bob"}]), "hi"),
        (body(tools=None, stop=None, temperature=None, stream=None), "where is my refund"),
        (json.dumps({"messages": USER}).encode(), "where is my refund"),
    ],
    ids=[
        "string",
        "text-parts-joined",
        "history-ignored",
        "name-accepted",
        "nulls-are-absent",
        "no-model",
    ],
)
def test_the_last_user_text_is_kept(raw: bytes, text: str) -> None:
    assert parse_chat_request(raw, LIMITS).text == text


@pytest.mark.parametrize("name", sorted(IGNORED))
def test_ignored_fields_are_accepted_and_never_kept(name: str) -> None:
    request = parse_chat_request(body(**{name: {"anything": "CANARY"}}), LIMITS)
    assert request.options == {}


def test_allowed_scalars_are_kept_and_n_is_dropped() -> None:
    options = dict(
        temperature=0.5,
        top_p=1,
        max_tokens=10,
        max_completion_tokens=20,
        seed=-3,
        presence_penalty=-2.0,
        frequency_penalty=2,
        n=1,
    )
    request = parse_chat_request(body(**options), LIMITS)
    del options["n"]
    assert request.options == options
    assert request.stream is False


def test_stream_options() -> None:
    request = parse_chat_request(body(stream=True, stream_options={"include_usage": True}), LIMITS)
    assert (request.stream, request.include_usage) == (True, True)


BAD: list[tuple[str, bytes, str | None, str]] = [
    ("invalid-json", b'{"messages": [', None, "invalid_json"),
    ("not-utf8", b'{"messages": "\xff"}', None, "invalid_json"),
    ("bom", b"\xef\xbb\xbf" + body(), None, "invalid_json"),
    ("duplicate-key", b'{"messages": [], "messages": []}', None, "invalid_json"),
    (
        "duplicate-nested",
        b'{"messages": [{"role": "user", "role": "user", "content": "x"}]}',
        None,
        "invalid_json",
    ),
    ("nan", body()[:-1] + b', "temperature": NaN}', None, "invalid_json"),
    ("infinity", body()[:-1] + b', "temperature": Infinity}', None, "invalid_json"),
    ("minus-infinity", body()[:-1] + b', "temperature": -Infinity}', None, "invalid_json"),
    ("overflow-float", body()[:-1] + b', "temperature": 1e999}', None, "invalid_json"),
    ("huge-int", body()[:-1] + b', "seed": ' + b"9" * 5000 + b"}", None, "invalid_json"),
    (
        "deep-nesting",
        b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        None,
        "invalid_json",
    ),
    ("array", b"[]", None, "invalid_json"),
    ("string", b'"hello"', None, "invalid_json"),
    ("no-messages", b'{"model": "x"}', "messages", "invalid_request"),
    ("empty-messages", body(messages=[]), "messages", "invalid_request"),
    ("messages-object", body(messages={"role": "user"}), "messages", "invalid_request"),
    ("message-string", body(messages=["hi"]), "messages[0]", "invalid_type"),
    (
        "unknown-role",
        body(messages=[{"role": "root", "content": "x"}, *USER]),
        "messages[0].role",
        "invalid_value",
    ),
    (
        "last-assistant",
        body(messages=[*USER, {"role": "assistant", "content": "Sure"}]),
        "messages[1].role",
        "invalid_value",
    ),
    (
        "last-tool",
        body(messages=[*USER, {"role": "tool", "content": "x", "tool_call_id": "1"}]),
        "messages[1].role",
        "invalid_value",
    ),
    (
        "last-system",
        body(messages=[{"role": "system", "content": "x"}]),
        "messages[0].role",
        "invalid_value",
    ),
    ("content-missing", body(messages=[{"role": "user"}]), "messages[0].content", "invalid_type"),
    (
        "content-null",
        body(messages=[{"role": "user", "content": None}]),
        "messages[0].content",
        "invalid_type",
    ),
    (
        "content-number",
        body(messages=[{"role": "user", "content": 5}]),
        "messages[0].content",
        "invalid_type",
    ),
    (
        "content-empty-list",
        body(messages=[{"role": "user", "content": []}]),
        "messages[0].content",
        "invalid_type",
    ),
    (
        "image-part",
        body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        ),
        "messages[0].content[0].type",
        "unsupported_content",
    ),
    (
        "audio-part",
        body(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]),
        "messages[0].content[0].type",
        "unsupported_content",
    ),
    (
        "file-part",
        body(messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]),
        "messages[0].content[0].type",
        "unsupported_content",
    ),
    (
        "part-without-text",
        body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        "messages[0].content[0].text",
        "invalid_type",
    ),
    (
        "part-extra-key",
        body(
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}
            ]
        ),
        "messages[0].content[0].cache_control",
        "unknown_parameter",
    ),
    (
        "last-message-extra-key",
        body(messages=[{"role": "user", "content": "x", "tool_calls": []}]),
        "messages[0].tool_calls",
        "unknown_parameter",
    ),
    (
        "lone-surrogate",
        b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
        "messages[0].content",
        "invalid_value",
    ),
    (
        "too-long",
        body(messages=[{"role": "user", "content": "x" * 201}]),
        "messages",
        "input_too_long",
    ),
    ("temperature-high", body(temperature=2.5), "temperature", "invalid_value"),
    ("temperature-string", body(temperature="1"), "temperature", "invalid_type"),
    ("temperature-bool", body(temperature=True), "temperature", "invalid_type"),
    ("top-p-high", body(top_p=1.01), "top_p", "invalid_value"),
    ("penalty-low", body(presence_penalty=-2.1), "presence_penalty", "invalid_value"),
    ("max-tokens-zero", body(max_tokens=0), "max_tokens", "invalid_value"),
    ("max-tokens-float", body(max_tokens=10.5), "max_tokens", "invalid_type"),
    (
        "max-completion-string",
        body(max_completion_tokens="9"),
        "max_completion_tokens",
        "invalid_type",
    ),
    ("n-two", body(n=2), "n", "invalid_value"),
    ("seed-float", body(seed=1.5), "seed", "invalid_type"),
    ("seed-huge", body(seed=2**64), "seed", "invalid_value"),
    ("stream-string", body(stream="true"), "stream", "invalid_type"),
    ("stream-options-list", body(stream=True, stream_options=[]), "stream_options", "invalid_type"),
    (
        "stream-options-without-stream",
        body(stream_options={"include_usage": True}),
        "stream_options",
        "invalid_value",
    ),
    (
        "stream-options-unknown",
        body(stream=True, stream_options={"x": 1}),
        "stream_options.x",
        "unknown_parameter",
    ),
    (
        "include-usage-string",
        body(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
        "invalid_type",
    ),
    (
        "role-list",
        body(messages=[{"role": [], "content": "x"}]),
        "messages[0].role",
        "invalid_value",
    ),
    (
        "earlier-role-object",
        body(messages=[{"role": {}, "content": "x"}, *USER]),
        "messages[0].role",
        "invalid_value",
    ),
    ("unknown-field", body(chat_template="{{ evil }}"), "chat_template", "unknown_parameter"),
    ("unknown-api-base", body(api_base="http://evil"), "api_base", "unknown_parameter"),
]


@pytest.mark.parametrize(
    ("raw", "param", "code"), [case[1:] for case in BAD], ids=[case[0] for case in BAD]
)
def test_bad_requests_are_400_naming_the_param(raw: bytes, param: str | None, code: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_chat_request(raw, LIMITS)
    assert (caught.value.param, caught.value.code) == (param, code)
    assert caught.value.message


@pytest.mark.parametrize(
    "raw",
    [
        body()[:-1] + b', "\\ud800": 1}',
        b'{"messages": [{"role": "user", "content": "hi", "\\udfff": 1}]}',
        b'{"messages": [], "\\ud800": 1, "\\ud800": 2}',
    ],
    ids=["unknown-field", "unknown-message-key", "duplicate-key"],
)
def test_errors_that_quote_a_lone_surrogate_are_still_json(raw: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_chat_request(raw, LIMITS)
    assert "\ud800" in caught.value.message or "\udfff" in caught.value.message
    answer = respond.error(400, caught.value.message, code=caught.value.code, param=None)
    assert json.loads(answer.body)["error"]["message"] == caught.value.message
    answer.body.decode("ascii")  # escaped, so any transport can carry it


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_fields_are_400(name: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_chat_request(body(**{name: {"x": "CANARY"}}), LIMITS)
    assert (caught.value.param, caught.value.code) == (name, "unsupported_parameter")


def test_upstream_body_is_built_from_the_decision_only() -> None:
    request = parse_chat_request(
        body(
            temperature=0.2,
            max_tokens=100_000,
            max_completion_tokens=7,
            seed=5,
            user="CANARY",
            metadata={"a": "CANARY"},
        ),
        LIMITS,
    )
    sent = upstream_body(request, approved(), LIMITS.max_tokens_cap)
    assert json.loads(sent) == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "RAIL PROMPT"}],
        "stream": False,
        "max_completion_tokens": 7,
        "max_tokens": 500,
        "seed": 5,
        "temperature": 0.2,
    }
    assert b"CANARY" not in sent


def test_upstream_body_streams_with_usage_and_rail_messages() -> None:
    decision = approved(
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"}, model="gpt-4o"
    )
    request = ChatRequest(text="x", stream=True, include_usage=True)
    assert json.loads(upstream_body(request, decision, 10)) == {
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_upstream_body_refuses_an_unapproved_decision() -> None:
    refused = Decision(
        action="refuse",
        intent="medical",
        score=0.9,
        threshold=0.6,
        neighbours=(),
        digest="d",
        message="no",
    )
    with pytest.raises(ValueError, match="must not be sent upstream"):
        upstream_body(ChatRequest(text="x"), refused, 10)


@pytest.mark.parametrize("module", ["chat", "respond", "gate", "intake", "asgi", "sse"])
def test_shared_door_modules_import_no_web_framework(module: str) -> None:
    """The proxy and the middleware share these, so they name no framework."""
    import ast
    from pathlib import Path

    import railproxy

    tree = ast.parse((Path(railproxy.__file__).parent / f"{module}.py").read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
    }
    assert not imported & {"fastapi", "starlette", "click", "uvicorn"}
