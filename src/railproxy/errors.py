"""The exceptions railproxy raises.

Every message says what went wrong, where, and how to fix it. A refusal is a
`Decision`, never an exception.

    RailproxyError
    ├── RailsError        rails/pii.yaml:4: intent 'ssn' has no examples
    ├── IndexProblem      base of the index problems below
    │   ├── IndexNotFound no index in rails/.index — run: railproxy reindex rails/
    │   ├── StaleIndex    rails/ changed since indexing — run: railproxy reindex rails/
    │   └── CorruptIndex  rails/.index/index-3f2a.faiss does not match its manifest
    ├── InputError        the request's text cannot be checked (HTTP 400)
    │   └── InputTooLong  longer than the model's window (HTTP 400 input_too_long)
    ├── GuardUnavailable  the guard could not decide; fail closed (HTTP 503)
    └── UpstreamError     the upstream failed; the proxy answers 502/504/429
"""

from __future__ import annotations


class RailproxyError(Exception):
    """Base class of every error railproxy raises on purpose."""


class RailsError(RailproxyError):
    """A rails directory is invalid. The message names file, line and intent."""


class IndexProblem(RailproxyError):
    """The index cannot be used as it is; the message says how to rebuild it."""


class IndexNotFound(IndexProblem):
    pass


class StaleIndex(IndexProblem):
    pass


class CorruptIndex(IndexProblem):
    pass


class InputError(RailproxyError):
    """The text to check is unusable. `code` is the OpenAI-style error code."""

    code = "invalid_input"


class InputTooLong(InputError):
    code = "input_too_long"


class GuardUnavailable(RailproxyError):
    """The guard could not reach a decision. Callers must fail closed."""


class UpstreamError(RailproxyError):
    """The upstream LLM failed. `status` is what the proxy answers with."""

    def __init__(self, message: str, *, status: int = 502, retry_after: str | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
