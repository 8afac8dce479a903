"""How long a client waits for its answer, when its request says so.

A client that gives up after T seconds loses an answer that comes later, however complete; a server that
knows T refuses at once, with a Retry-After, a request its queue would hold past T (``routing/policy.py``).
Two headers say it:

- ``X-Request-Timeout-S``: seconds for the whole answer (a streamed one included). A malformed value is
  a 400 naming the header, from the guard middleware.
- ``X-Stainless-Read-Timeout``: what the OpenAI SDKs send, their read timeout. A non-streamed answer
  sends nothing before it is complete, so it bounds the whole answer; a streamed one, only the first
  token. A malformed value is ignored: the client did not choose it for us.

The guard middleware puts the values into a context variable, which the ingress reads in the same
request's task; requests that carry neither header are bounded by the server's deadline alone.
"""

from __future__ import annotations

import math
from contextvars import ContextVar

TIMEOUT_HEADER = "x-request-timeout-s"
READ_TIMEOUT_HEADER = "x-stainless-read-timeout"
MAX_CLIENT_TIMEOUT_S = 86_400.0
TIMEOUT_ERROR = f"X-Request-Timeout-S must be a number of seconds in (0, {MAX_CLIENT_TIMEOUT_S:.0f}]"

# (X-Request-Timeout-S, X-Stainless-Read-Timeout) in seconds, for the request this task serves.
SECONDS: ContextVar[tuple[float | None, float | None]] = ContextVar("client_timeout_s", default=(None, None))


def seconds(raw: str | None) -> float | None:
    """A header's value in seconds; None when absent or malformed."""
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 < value <= MAX_CLIENT_TIMEOUT_S else None


def client_timeout(stream: bool) -> tuple[float | None, bool]:
    """(seconds the client waits, whether they bound only the first byte) for the current request."""
    total, read = SECONDS.get()
    if total is not None:
        return total, False
    if read is not None:
        return read, stream
    return None, False
