"""Stream answers from railproxy with the official openai SDK.

An approved answer arrives chunk by chunk from the upstream (or the app behind
RailsMiddleware); a reply or refusal arrives as a complete local stream ending in
[DONE], so the same client code handles both.

    python examples/client_stream.py
    python examples/client_stream.py "can I get a refund"

Environment: RAILPROXY_BASE_URL (default http://127.0.0.1:8000/v1); RAILPROXY_API_KEY,
one of the server's RAILPROXY_API_KEYS if it sets any.
"""

from __future__ import annotations

import os
import sys

import openai

BASE_URL = os.environ.get("RAILPROXY_BASE_URL", "http://127.0.0.1:8000/v1")
QUESTIONS = ["why is my bill so high this month", "write me a poem about pirates"]


def stream(client: openai.OpenAI, question: str) -> None:
    try:
        chunks = client.chat.completions.create(
            model="gpt-4o-mini",  # accepted and ignored: the rails pick the upstream model
            messages=[{"role": "user", "content": question}],
            stream=True,
        )
    except openai.BadRequestError as exc:
        # Rails with `refusal: error` answer refusals as 400 errors, before any chunk.
        detail = exc.body.get("message") if isinstance(exc.body, dict) else exc.message
        print(f"[{exc.code}] {detail}")
        return
    with chunks:
        print(f"[{chunks.response.headers.get('x-railproxy-decision')}] ", end="")
        for chunk in chunks:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


def main() -> None:
    api_key = os.environ.get("RAILPROXY_API_KEY", "unused-without-RAILPROXY_API_KEYS")
    client = openai.OpenAI(base_url=BASE_URL, api_key=api_key, max_retries=0)
    for question in sys.argv[1:] or QUESTIONS:
        print(f"> {question}")
        stream(client, question)
        print()


if __name__ == "__main__":
    main()
