"""HTTP errors: one shape for every error body, auth and body-size limits, exception handlers.

Every error is ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with one short
sentence: never a traceback, a file path or an internal class name. Refusals from the tiers arrive
as values (``aiflow_ray.errors.Refusal``) and map one to one.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayError

from aiflow_ray import envs
from aiflow_ray.api import client_timeout
from aiflow_ray.config.app import RateLimitArgs
from aiflow_ray.errors import Refusal
from aiflow_ray.logging_utils import clip, get_logger

log = get_logger(__name__)

OPEN_PATHS = {"/health", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.retry_after_s = status, message, field, retry_after_s


def error_response(status: int, message: str, field: str | None = None,
                   retry_after_s: int | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "unavailable",
                      "param": field, "code": status}}
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.field, exc.retry_after_s)


async def _overloaded(_request: Request, exc: Exception) -> JSONResponse:
    # Serve refused to queue more work for a tier (max_queued_requests), or no replica of it is running:
    # the client should back off.
    retry_after_s = max(int(getattr(exc, "retry_after_s", None) or 1), 1)
    return error_response(503, "the cluster is at capacity; retry shortly", None, retry_after_s)


# Parts of a pydantic error location that name a member of a union type, not a field.
_TYPE_TAGS = re.compile(r"^(literal\[.*\]|function-.*|int|str|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def _field_of(loc: tuple[Any, ...]) -> str:
    # The first element says where the field was (body, path, query, header); a body field may itself be
    # called "path", so only the first element is dropped.
    if loc and loc[0] in ("body", "path", "query", "header"):
        loc = loc[1:]
    parts = [str(p) for p in loc if not _TYPE_TAGS.match(str(p))]
    return ".".join(parts)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors()) or [{"loc": ("body",), "msg": "invalid request"}]
    # A value that fits no member of a union fails once per member: the deepest failure is the one
    # that says what is wrong (a list of parts with a bad part, rather than "not a string").
    first = max(errors, key=lambda e: len(_field_of(tuple(e.get("loc", ()))).split(".")))
    # A location can name keys the client made up (an extra field): the answer repeats them bounded.
    field = clip(_field_of(tuple(first.get("loc", ()))))
    message = clip(str(first.get("msg", "invalid")).removeprefix("Value error, "), 300)
    # 400, not FastAPI's 422: what OpenAI's API and vLLM's servers answer, and what their clients expect.
    return error_response(400, f"{field or 'body'}: {message}", field or "body")


def failure_response(exc: BaseException) -> JSONResponse:
    """Anything no handler took: one sentence for the client, the details in the replica's log only.

    A tier that died, timed out or was unreachable is a 503 with Retry-After (the request may succeed on
    a replacement); only a bug in this code is a 500.
    """
    from ray.serve.exceptions import RayServeException

    from aiflow_ray.errors import TierUnavailable

    if isinstance(exc, TierUnavailable):
        log.warning("a tier call failed: %s", exc)
        return error_response(503, f"the {exc.tier} tier did not answer in time ({exc.reason}); retry shortly",
                              None, 1)
    if isinstance(exc, RayError | RayServeException | TimeoutError):
        log.warning("a tier call failed: %s", type(exc).__name__)
        return error_response(503, "a tier failed while serving this request; retry shortly", None, 1)
    log.error("unexpected error in the ingress", exc_info=exc)
    return error_response(500, "internal error; the details are in the server's log", None)


class ErrorBoundary:
    """The outermost middleware: whatever escapes the app becomes a JSON error, and nothing escapes this.

    Starlette's catch-all handler answers and then re-raises; under Serve, the re-raised exception can
    overtake the answer, and the proxy replaces it with a bare ``500 Internal Server Error``. Here the
    answer is sent and the exception ends, so a dead tier is always a JSON 503 with Retry-After.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:
            if started:  # a stream already under way: it ends here; its client sees a truncated stream
                log.warning("a response failed after it started: %s", type(exc).__name__)
                return
            await failure_response(exc)(scope, receive, send)


class AiflowAPI(FastAPI):
    """FastAPI whose exception handlers, once installed here, stay: Serve installs its own for back-pressure
    when the replica starts (a plain-text 503 without Retry-After), which would replace ours."""

    def add_exception_handler(self, exc_class_or_status_code: Any, handler: Any) -> None:
        if getattr(self, "_aiflow_handlers_installed", False) and exc_class_or_status_code in self.exception_handlers:
            return
        super().add_exception_handler(exc_class_or_status_code, handler)


def refusal_error(refusal: Refusal) -> ApiError:
    return ApiError(refusal.status, refusal.message, refusal.field, refusal.retry_after_s)


class _BodyTooLarge(Exception):
    pass


ADMIN_PREFIX = "/v1/admin/"


def _route_path(scope: dict[str, Any]) -> str:
    """The path the router matches: under a route prefix (``root_path``) the scope's path still carries it."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


def _caller_of_key(key: str) -> str:
    # A digest, never the key: the limiter's table outlives the request and may end up in a dump.
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class RateLimiter:
    """A token bucket per caller, in this process only: every ingress replica limits on its own.

    No await between reading and writing a bucket, so the requests of one event loop cannot race.
    """

    def __init__(self, args: RateLimitArgs, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_callers = args.requests_per_s, float(args.burst), args.max_callers
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # caller -> (tokens, when)

    def retry_after_s(self, caller: str) -> int | None:
        """Spend one of ``caller``'s tokens: None when it had one, else the whole seconds until it will (>= 1)."""
        if self.rate is None:
            return None
        now = self.clock()
        tokens, when = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        wait = None
        if tokens >= 1:
            tokens -= 1
        else:
            wait = max(1, math.ceil((1 - tokens) / self.rate))
        self._buckets[caller] = (tokens, now)  # re-inserted last: the most recently seen
        if len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)
        return wait


class GuardMiddleware:
    """Bearer auth, a per-caller rate limit and a request body size limit (pure ASGI).

    Keys come from AIFLOW_API_KEY and AIFLOW_ADMIN_KEY (read per request). Admin routes are the paths
    under ``/v1/admin/``; the open paths (``OPEN_PATHS``: probes, metrics, docs) need no key and are
    never rate limited. Everything else is a user route:

    - no key set: every route is open (local development);
    - API key set: user routes need ``Authorization: Bearer <API key>`` or the admin key, which grants
      them too; admin routes need the admin key, and the API key alone gets 403 on them;
    - API key set but no admin key: admin routes answer 403 (disabled) whatever the request carries;
    - only the admin key set: user routes are open, admin routes need the admin key;
    - a missing or wrong key gets 401 with ``WWW-Authenticate: Bearer``.

    The header is compared with every configured key, each in constant time and none skipped, so
    neither the timing nor which key matched tells a guesser anything.

    Rate limit (``RateLimitArgs``, off unless ``requests_per_s`` is set): a token bucket per caller, in
    this replica (each ingress replica counts on its own). The caller is the key that authenticated
    the request, by a digest; otherwise the client's host, so a wrong key counts against its host and
    guessing keys is limited too. Behind a proxy that hides client addresses, keyless callers share one
    bucket. Over the limit: 429 with ``Retry-After`` in whole seconds.

    The body limit holds for chunked bodies too: Content-Length is checked up front, and the bytes
    actually received are counted as the application reads them.
    """

    def __init__(self, app: Any, max_body_bytes: int, rate_limit: RateLimitArgs | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.limiter = RateLimiter(rate_limit or RateLimitArgs(), clock)

    @staticmethod
    def _granted(authorization: bytes, keys: dict[str, str]) -> str | None:
        """Which configured key (``api`` or ``admin``) the header carries, if any."""
        granted = None
        for name, key in keys.items():
            if hmac.compare_digest(authorization, b"Bearer " + key.encode()):
                granted = name
        return granted

    @staticmethod
    def _refusal(admin_route: bool, keys: dict[str, str], granted: str | None) -> tuple[int, str] | None:
        if admin_route:
            if granted == "admin" or not keys:
                return None
            if "admin" not in keys:
                return 403, "admin routes are disabled: set AIFLOW_ADMIN_KEY"
            if granted == "api":
                return 403, "admin routes need the admin key"
            return 401, "missing or wrong admin key (Authorization: Bearer <admin key>)"
        if "api" not in keys or granted is not None:
            return None
        return 401, "missing or wrong API key (Authorization: Bearer <key>)"

    async def _guard(self, scope: dict[str, Any], receive: Any, send: Any) -> bool:
        """Answer the request here when it may not go on (401, 403, 429); True when it may."""
        path = _route_path(scope)
        if path in OPEN_PATHS:
            return True
        keys = {name: key for name, key in (("api", envs.api_key()), ("admin", envs.admin_key())) if key}
        authorization = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), b"")
        granted = self._granted(authorization, keys) if keys else None
        if granted is not None:
            caller = _caller_of_key(keys[granted])
        else:
            client = scope.get("client")
            caller = f"host:{client[0] if client else 'unknown'}"
        wait = self.limiter.retry_after_s(caller)
        if wait is not None:
            await error_response(429, f"too many requests; retry in {wait} s", None, wait)(scope, receive, send)
            return False
        refusal = self._refusal(path.startswith(ADMIN_PREFIX), keys, granted)
        if refusal is None:
            return True
        response = error_response(refusal[0], refusal[1], "authorization")
        if refusal[0] == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not await self._guard(scope, receive, send):
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        total_raw = headers.get(client_timeout.TIMEOUT_HEADER)
        total_s = client_timeout.seconds(total_raw)
        if total_raw is not None and total_s is None:
            await error_response(400, client_timeout.TIMEOUT_ERROR, "X-Request-Timeout-S")(scope, receive, send)
            return
        client_timeout.SECONDS.set((total_s, client_timeout.seconds(headers.get(client_timeout.READ_TIMEOUT_HEADER))))
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await error_response(413, f"request body over {self.max_body_bytes} bytes", "body")(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if started:
                raise
            await error_response(413, f"request body over {self.max_body_bytes} bytes", "body")(scope, receive, send)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's and Starlette's own refusals (an unparsable body, an unknown route, a wrong method) in our
    error shape, not theirs (``{"detail": ...}``)."""
    status = int(getattr(exc, "status_code", 500))
    if status == 400:
        return error_response(400, "body: not a valid JSON document", "body")
    detail = str(getattr(exc, "detail", "") or "error")
    return error_response(status, clip(detail, 200), None)


def install_error_handlers(api: Any) -> None:
    """Our handlers, and the error boundary outside every other middleware (add it last)."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    from starlette.exceptions import HTTPException

    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(BackPressureError, _overloaded)
    api.add_exception_handler(DeploymentUnavailableError, _overloaded)
    api._aiflow_handlers_installed = True
    api.add_middleware(ErrorBoundary)
