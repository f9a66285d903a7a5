"""Chat Completions request bytes -> `ChatRequest`, and the rebuilt upstream body.

Shared by every door (the proxy and the ASGI middleware), framework-free.

Parsing is strict: invalid UTF-8 or JSON, duplicate keys, NaN/Infinity, a
non-object, a wrong type or an out-of-range number is a `BadRequest` (HTTP 400)
naming the parameter. Only the text of the last message is kept, and it must be
a `user` message of text. Every top-level field falls in exactly one class:

- allow-listed scalars (`ALLOWED`): range-checked here, copied upstream;
- ignored (`IGNORED`): bookkeeping that cannot change the answer (the client's
  `model`, `user`, `metadata`, `store`, ...); accepted whatever its value, never sent;
- unsupported (`UNSUPPORTED`): fields the client relies on for the content or
  shape of the answer (`tools`, `response_format`, `stop`, `logit_bias`, ...);
  dropping them would silently hand back something else, so they are a 400;
- anything else: a 400 `unknown_parameter`, as OpenAI itself answers.

A `null` value for a known field means "not given", as in the OpenAI API.

`upstream_body` builds the upstream request from scratch: the decision's
messages and model, `stream`, and the allow-listed scalars. Nothing else from
the client is copied, so no client text can reach the upstream.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from railproxy.decide import Decision
from railproxy.errors import RailproxyError
from railproxy.settings import ServerConfig

# name -> (minimum, maximum), inclusive.
_NUMBERS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
ALLOWED = frozenset({*_NUMBERS, *TOKEN_FIELDS, "seed", "n", "stream", "stream_options"})
IGNORED = frozenset(
    {
        "model",
        "user",
        "metadata",
        "store",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "service_tier",
        "parallel_tool_calls",
    }
)
UNSUPPORTED = frozenset(
    {
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "prediction",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "stop",
        "audio",
        "modalities",
        "web_search_options",
        "reasoning_effort",
        "verbosity",
    }
)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_SEED_RANGE = (-(2**63), 2**63 - 1)


class BadRequest(RailproxyError):
    """The request is malformed or asks for something railproxy does not do (HTTP 400)."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str = "invalid_request"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What railproxy keeps of a chat request."""

    text: str  # the last user message's text: the only thing matched
    stream: bool = False
    include_usage: bool = False
    options: Mapping[str, int | float] = field(default_factory=dict)  # checked, unclamped


def parse_chat_request(body: bytes, limits: ServerConfig) -> ChatRequest:
    """Validate a Chat Completions body. Raises `BadRequest` naming the parameter."""
    data = _load(body)
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object", code="invalid_json")
    options: dict[str, int | float] = {}
    for name, value in data.items():
        if value is None or name in IGNORED or name in ("messages", "stream", "stream_options"):
            continue
        if name in UNSUPPORTED:
            raise BadRequest(
                f"'{name}' is not supported: railproxy sends only the prompts its rails "
                "approve, with no tools, formats or stop sequences from the request",
                param=name,
                code="unsupported_parameter",
            )
        if name not in ALLOWED:
            raise BadRequest(
                f"unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
        options[name] = _scalar(name, value)
    options.pop("n", None)  # checked to be 1; the upstream default is 1
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _type_error("stream", "a boolean")
    include_usage = _stream_options(data.get("stream_options"), bool(stream))
    text = _last_user_text(data.get("messages"))
    if len(text) > limits.max_input_chars:
        raise BadRequest(
            f"the message is {len(text)} characters; the limit is {limits.max_input_chars}",
            param="messages",
            code="input_too_long",
        )
    return ChatRequest(text=text, stream=bool(stream), include_usage=include_usage, options=options)


def upstream_body(request: ChatRequest, decision: Decision, cap: int) -> bytes:
    """The bytes sent upstream for an approved decision, built from scratch."""
    if not decision.approved or decision.upstream_model is None:
        raise ValueError(f"decision {decision.action!r} must not be sent upstream")
    body: dict[str, Any] = {
        "model": decision.upstream_model,
        "messages": [
            {"role": str(message["role"]), "content": str(message["content"])}
            for message in decision.upstream_messages
        ],
        "stream": request.stream,
    }
    for name in sorted(request.options):
        value = request.options[name]
        body[name] = min(int(value), cap) if name in TOKEN_FIELDS else value
    if request.stream and request.include_usage:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _load(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("the request body is not valid UTF-8", code="invalid_json") from exc
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except RecursionError as exc:
        raise BadRequest("the request body is nested too deeply", code="invalid_json") from exc
    except ValueError as exc:  # JSONDecodeError, and ints over Python's digit limit
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BadRequest(f"duplicate key '{key}' in the request body", code="invalid_json")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not valid JSON", code="invalid_json")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"the number {text[:20]} is out of range", code="invalid_json")
    return value


def _type_error(param: str, expected: str) -> BadRequest:
    return BadRequest(f"'{param}' must be {expected}", param=param, code="invalid_type")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar(name: str, value: Any) -> int | float:
    if name in _NUMBERS:
        low, high = _NUMBERS[name]
        if not (_is_int(value) or isinstance(value, float)):
            raise _type_error(name, "a number")
        if not low <= value <= high:
            raise BadRequest(
                f"'{name}' must be between {low:g} and {high:g}",
                param=name,
                code="invalid_value",
            )
        return float(value) if isinstance(value, float) else int(value)
    if not _is_int(value):
        raise _type_error(name, "an integer")
    if name in TOKEN_FIELDS and value < 1:
        raise BadRequest(f"'{name}' must be at least 1", param=name, code="invalid_value")
    if name == "n" and value != 1:
        raise BadRequest(
            "'n' must be 1: railproxy returns a single choice", param="n", code="invalid_value"
        )
    if name == "seed" and not _SEED_RANGE[0] <= value <= _SEED_RANGE[1]:
        raise BadRequest("'seed' must fit in 64 bits", param="seed", code="invalid_value")
    return int(value)


def _stream_options(value: Any, stream: bool) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise _type_error("stream_options", "an object")
    if not stream:
        raise BadRequest(
            "'stream_options' is only allowed when 'stream' is true",
            param="stream_options",
            code="invalid_value",
        )
    for key in value:
        if key != "include_usage":
            raise BadRequest(
                f"unrecognized request argument supplied: stream_options.{key}",
                param=f"stream_options.{key}",
                code="unknown_parameter",
            )
    usage = value.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _type_error("stream_options.include_usage", "a boolean")
    return bool(usage)


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{position}]", "an object")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(
                f"messages[{position}].role must be one of {', '.join(sorted(ROLES))}",
                param=f"messages[{position}].role",
                code="invalid_value",
            )
    last = len(messages) - 1
    message = messages[last]
    where = f"messages[{last}]"
    if message["role"] != "user":
        raise BadRequest(
            f"the last message must be a user message, not {message['role']!r}: railproxy "
            "checks one user text per request (tool results and assistant prefill are "
            "not supported)",
            param=f"{where}.role",
            code="invalid_value",
        )
    for key in message:
        if key not in ("role", "content", "name"):  # `name` is accepted and never sent
            raise BadRequest(
                f"unrecognized request argument supplied: {where}.{key}",
                param=f"{where}.{key}",
                code="unknown_parameter",
            )
    text = _content_text(message.get("content"), f"{where}.content")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(
            "the message contains invalid Unicode (a lone surrogate)",
            param=f"{where}.content",
            code="invalid_value",
        ) from exc
    return text


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _type_error(where, "a string or a non-empty array of text parts")
    texts = []
    for position, part in enumerate(content):
        here = f"{where}[{position}]"
        if not isinstance(part, dict):
            raise _type_error(here, "an object")
        kind = part.get("type")
        if kind != "text":
            raise BadRequest(
                f"{here}: only text content is supported, not {kind!r} "
                "(images, audio and files never reach the upstream)",
                param=f"{here}.type",
                code="unsupported_content",
            )
        for key in part:
            if key not in ("type", "text"):
                raise BadRequest(
                    f"unrecognized request argument supplied: {here}.{key}",
                    param=f"{here}.{key}",
                    code="unknown_parameter",
                )
        if not isinstance(part.get("text"), str):
            raise _type_error(f"{here}.text", "a string")
        texts.append(part["text"])
    return "\n".join(texts)
