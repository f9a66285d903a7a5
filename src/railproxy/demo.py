"""The built-in demo upstream, used when `railproxy serve` gets no `--upstream`.

An in-process httpx transport (no socket, no network) that answers like an
OpenAI-compatible server: deterministically, by quoting the hardcoded prompt it
received, so an operator can see exactly what their rails send upstream. It
streams when asked. Nothing it says comes from a model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

logger = logging.getLogger(__name__)

DEMO_URL = "http://demo-upstream.railproxy.invalid/v1"
BANNER = "[railproxy demo upstream: no LLM was called]"


class DemoTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        logger.warning(
            "DEMO UPSTREAM ACTIVE: no --upstream given, so answers come from railproxy's "
            "built-in demo, not from an LLM. Pass --upstream URL to use a real one."
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or not request.url.path.endswith("/chat/completions"):
            return httpx.Response(404, json={"error": {"message": "not found"}})
        body = json.loads(await request.aread())
        text = answer_text(body.get("messages", []))
        model = str(body.get("model", "demo"))
        if body.get("stream"):
            return httpx.Response(
                200,
                headers={"content-type": "text/event-stream"},
                stream=_Events(_events(text, model)),
            )
        return httpx.Response(200, json=_completion(text, model))


def answer_text(messages: list[dict[str, Any]]) -> str:
    """What the demo says: the prompt it was sent, quoted."""
    prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)
    return f"{BANNER}\nThe upstream received this approved prompt:\n\n{prompt}"


class _Events(httpx.AsyncByteStream):
    def __init__(self, events: list[bytes]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self._events:
            yield event


def _completion(text: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-demo",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _events(text: str, model: str) -> list[bytes]:
    words = text.split(" ")
    pieces = [{"role": "assistant", "content": ""}]
    pieces += [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
    events = []
    for delta in [*pieces, {}]:
        chunk = {
            "id": "chatcmpl-demo",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None if delta else "stop"}],
        }
        events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    return [*events, b"data: [DONE]\n\n"]
