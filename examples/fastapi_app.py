"""An existing FastAPI app with its own /v1/chat/completions, guarded by RailsMiddleware.

The endpoint stands in for your LLM call: it streams back the prompt it received. That
prompt is always the matched rail's hardcoded prompt, because the middleware rebuilt the
request body; the user's text never reaches it. Refusals, replies and no-matches are
answered by the middleware, so the endpoint never sees them.

    railproxy reindex rails/
    python examples/fastapi_app.py        # http://127.0.0.1:8000
    python examples/client.py             # in another shell

Environment: RAILS_DIR (default rails/), HOST (default 127.0.0.1), PORT (default 8000).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from railproxy import RailsMiddleware

app = FastAPI()
app.add_middleware(RailsMiddleware, rails=os.environ.get("RAILS_DIR", "rails/"))


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await request.json()  # rebuilt: the rail's messages and model, stream, scalars
    decision = request.state.railproxy_decision  # what the middleware decided
    prompt = body["messages"][-1]["content"]
    answer = f"[echo LLM, intent {decision.intent}] {prompt}"
    headers = {"x-railproxy-decision": decision.action}
    if body["stream"]:
        events = stream_events(answer, body["model"])
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    return JSONResponse(completion(answer, body["model"]), headers=headers)


def completion(text: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-echo",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
    }


def stream_events(text: str, model: str) -> Iterator[str]:
    """Server-sent events, one word per chunk, ending in [DONE]."""
    words = text.split(" ")
    deltas: list[dict[str, str]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": word if i == 0 else " " + word} for i, word in enumerate(words)]
    for delta in [*deltas, {}]:
        chunk = {
            "id": "chatcmpl-echo",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None if delta else "stop"}],
        }
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


if __name__ == "__main__":
    import uvicorn

    host = os.environ.get("HOST", "127.0.0.1")
    uvicorn.run(app, host=host, port=int(os.environ.get("PORT", "8000")))
