"""Ask railproxy a few questions with the official openai SDK.

Works against `railproxy serve` and against any app guarded by RailsMiddleware
(examples/fastapi_app.py). Each answer is printed after the decision railproxy made
(the `x-railproxy-decision` header: prompt, reply, refuse or no_match).

    python examples/client.py                          # the default questions
    python examples/client.py "how do I pay my bill"   # your own

Environment: RAILPROXY_BASE_URL (default http://127.0.0.1:8000/v1); RAILPROXY_API_KEY,
one of the server's RAILPROXY_API_KEYS if it sets any.
"""

from __future__ import annotations

import os
import sys

import openai

BASE_URL = os.environ.get("RAILPROXY_BASE_URL", "http://127.0.0.1:8000/v1")
QUESTIONS = [
    "why is my bill so high this month",  # approved: the rail's prompt goes upstream
    "hello",  # a canned reply
    "write me a poem about pirates",  # no rail matches: refused locally
]


def ask(client: openai.OpenAI, question: str) -> str:
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",  # accepted and ignored: the rails pick the upstream model
            messages=[{"role": "user", "content": question}],
        )
    except openai.BadRequestError as exc:
        # Rails with `refusal: error` answer refusals as 400 errors with a code.
        detail = exc.body.get("message") if isinstance(exc.body, dict) else exc.message
        return f"[{exc.code}] {detail}"
    answer = raw.parse().choices[0].message.content
    return f"[{raw.headers.get('x-railproxy-decision')}] {answer}"


def main() -> None:
    api_key = os.environ.get("RAILPROXY_API_KEY", "unused-without-RAILPROXY_API_KEYS")
    client = openai.OpenAI(base_url=BASE_URL, api_key=api_key, max_retries=0)
    for question in sys.argv[1:] or QUESTIONS:
        print(f"> {question}\n{ask(client, question)}\n")


if __name__ == "__main__":
    main()
