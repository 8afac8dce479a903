"""HTTP errors: one shape for every error body, auth and body-size limits, exception handlers.

Every error is ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape) with one short
sentence: never a traceback, a file path or an internal class name. Refusals from the tiers arrive
as values (``aiflow_ray.errors.Refusal``) and map one to one.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayError

from aiflow_ray import envs
from aiflow_ray.errors import Refusal
from aiflow_ray.logging_utils import get_logger

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


async def _overloaded(_request: Request, _exc: Exception) -> JSONResponse:
    # Serve refused to queue more work for a tier (max_queued_requests): the client should back off.
    return error_response(503, "the cluster is at capacity; retry shortly", None, 1)


# Parts of a pydantic error location that name a member of a union type, not a field.
_TYPE_TAGS = re.compile(r"^(literal\[.*\]|function-.*|int|str|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def _field_of(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body" and not _TYPE_TAGS.match(str(p))]
    return ".".join(parts)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors()) or [{"loc": ("body",), "msg": "invalid request"}]
    # A value that fits no member of a union fails once per member: the deepest failure is the one
    # that says what is wrong (a list of parts with a bad part, rather than "not a string").
    first = max(errors, key=lambda e: len(_field_of(tuple(e.get("loc", ()))).split(".")))
    field = _field_of(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    # 400, not FastAPI's 422: what OpenAI's API and vLLM's servers answer, and what their clients expect.
    return error_response(400, f"{field or 'body'}: {message}", field or "body")


async def _tier_failed(_request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: one sentence for the client, the details in the replica's log only."""
    if isinstance(exc, RayError):
        log.warning("a tier call failed: %s", type(exc).__name__)
        return error_response(503, "a tier failed while serving this request; retry shortly", None, 1)
    log.exception("unexpected error in the ingress", exc_info=exc)
    return error_response(500, "internal error; the details are in the server's log", None)


def refusal_error(refusal: Refusal) -> ApiError:
    return ApiError(refusal.status, refusal.message, refusal.field, refusal.retry_after_s)


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Bearer auth (when AIFLOW_API_KEY is set) and a request body size limit (pure ASGI).

    The limit holds for chunked bodies too: Content-Length is checked up front, and the bytes
    actually received are counted as the application reads them.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = envs.api_key()
        if key and scope.get("path", "") not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                await error_response(401, "missing or wrong API key (Authorization: Bearer <key>)", "authorization")(
                    scope, receive, send)
                return
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


def install_error_handlers(api: Any) -> None:
    from ray.serve.exceptions import BackPressureError

    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(BackPressureError, _overloaded)
    api.add_exception_handler(Exception, _tier_failed)
