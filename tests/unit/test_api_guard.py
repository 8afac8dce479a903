"""Bearer auth, admin key, rate limit and body-size limit of the ingress middleware (an isolated unit: no Ray)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from aiflow_ray.api.app import GuardMiddleware
from aiflow_ray.api.client_timeout import client_timeout
from aiflow_ray.api.errors import RateLimiter
from aiflow_ray.config import AppArgs
from aiflow_ray.config.app import RateLimitArgs
from aiflow_ray.logging_utils import clip

API, ADMIN = "s3cret", "adm1n"


def _app(rate_limit: RateLimitArgs | None = None, clock: Callable[[], float] | None = None) -> FastAPI:
    app = FastAPI()
    app.add_middleware(GuardMiddleware, max_body_bytes=1024, rate_limit=rate_limit,
                       **({"clock": clock} if clock else {}))

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received_bytes": len(await request.body())}

    @app.put("/v1/admin/links/{link_id}")
    async def admin(link_id: str) -> dict[str, str]:
        return {"link_id": link_id}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/timeout")
    async def timeout(stream: bool = False) -> dict[str, float | bool | None]:
        seconds, first_byte = client_timeout(stream)
        return {"seconds": seconds, "first_byte": first_byte}

    return app


def _keys(monkeypatch: pytest.MonkeyPatch, api: str | None, admin: str | None) -> None:
    for name, value in (("AIFLOW_API_KEY", api), ("AIFLOW_ADMIN_KEY", admin)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def client(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    _keys(monkeypatch, API, None)
    return TestClient(_app())


def test_missing_or_wrong_key_is_rejected(client: TestClient) -> None:
    missing = client.post("/v1/echo", json={})
    assert missing.status_code == 401 and missing.json()["error"]["param"] == "authorization"
    assert client.post("/v1/echo", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/v1/echo", json={}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_oversized_body_is_rejected(client: TestClient) -> None:
    response = client.post("/v1/echo", content=b"x" * 2048, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"


def test_chunked_body_over_the_limit_is_rejected(client: TestClient) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    small = client.post("/v1/echo", content=iter([b"x" * 400, b"x" * 400]), headers=auth)
    assert small.status_code == 200 and small.json() == {"received_bytes": 800}
    big = client.post("/v1/echo", content=iter([b"x" * 600, b"x" * 600]), headers=auth)  # no Content-Length
    assert big.status_code == 413 and big.json()["error"]["param"] == "body"


def _status(client: TestClient, route: str, key: str | None = None) -> int:
    headers = _bearer(key) if key else {}
    if route == "admin":
        return client.put("/v1/admin/links/l1", headers=headers).status_code
    return client.post("/v1/echo", json={}, headers=headers).status_code


def test_without_keys_every_route_is_open(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, None, None)
    client = TestClient(_app())
    assert _status(client, "user") == _status(client, "admin") == 200
    assert _status(client, "user", "anything") == _status(client, "admin", "anything") == 200


def test_the_api_key_serves_user_routes_but_not_admin_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, API, ADMIN)
    client = TestClient(_app())
    assert _status(client, "user", API) == 200
    refused = client.put("/v1/admin/links/l1", headers=_bearer(API))
    assert refused.status_code == 403
    assert refused.json()["error"] == {"message": "admin routes need the admin key", "type": "invalid_request_error",
                                       "param": "authorization", "code": 403}


def test_the_admin_key_serves_admin_and_user_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, API, ADMIN)
    client = TestClient(_app())
    assert _status(client, "admin", ADMIN) == _status(client, "user", ADMIN) == 200


def test_admin_routes_are_disabled_when_only_the_api_key_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, API, None)
    client = TestClient(_app())
    for key in (API, None, "adm1n"):
        response = client.put("/v1/admin/links/l1", headers=_bearer(key) if key else {})
        assert response.status_code == 403
        assert response.json()["error"]["message"] == "admin routes are disabled: set AIFLOW_ADMIN_KEY"
    assert _status(client, "user", API) == 200


def test_only_an_admin_key_leaves_user_routes_open(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, None, ADMIN)
    client = TestClient(_app())
    assert _status(client, "user") == _status(client, "user", "whatever") == 200
    assert _status(client, "admin") == _status(client, "admin", "wrong") == 401
    assert _status(client, "admin", ADMIN) == 200


@pytest.mark.parametrize("route", ["user", "admin"])
@pytest.mark.parametrize("header", [None, "Bearer nope", f"Bearer {API}x", API, f"bearer {ADMIN}", f"Basic {ADMIN}"])
def test_a_missing_or_wrong_key_gets_401_with_www_authenticate(monkeypatch: pytest.MonkeyPatch, route: str,
                                                               header: str | None) -> None:
    _keys(monkeypatch, API, ADMIN)
    client = TestClient(_app())
    headers = {"Authorization": header} if header else {}
    response = (client.put("/v1/admin/links/l1", headers=headers) if route == "admin"
                else client.post("/v1/echo", json={}, headers=headers))
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"]["param"] == "authorization"


def test_admin_routes_under_a_route_prefix_still_need_the_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # Serve passes an application's route prefix as root_path, and the path still carries it.
    _keys(monkeypatch, API, ADMIN)
    client = TestClient(_app(), root_path="/llama")
    assert client.put("/llama/v1/admin/links/l1", headers=_bearer(API)).status_code == 403
    assert client.put("/llama/v1/admin/links/l1", headers=_bearer(ADMIN)).status_code == 200
    assert client.get("/llama/healthz").status_code == 200


def test_the_header_is_compared_with_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    compared: list[tuple[bytes, bytes]] = []

    def compare_digest(a: bytes, b: bytes) -> bool:
        assert isinstance(a, bytes) and isinstance(b, bytes)  # the bytes form is the constant-time one
        compared.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr("aiflow_ray.api.errors.hmac", SimpleNamespace(compare_digest=compare_digest))
    _keys(monkeypatch, API, ADMIN)
    client = TestClient(_app())
    assert _status(client, "user", API) == 200  # matches the first key compared: the second is compared still
    assert sorted(b for _, b in compared) == [f"Bearer {ADMIN}".encode(), f"Bearer {API}".encode()]


def _clock() -> tuple[list[float], Callable[[], float]]:
    now = [1000.0]
    return now, lambda: now[0]


def test_over_the_rate_limit_gets_429_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, API, ADMIN)
    now, clock = _clock()
    client = TestClient(_app(RateLimitArgs(requests_per_s=0.5, burst=3), clock))
    assert [_status(client, "user", API) for _ in range(3)] == [200] * 3
    limited = client.post("/v1/echo", json={}, headers=_bearer(API))
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"  # one token at 0.5/s
    assert limited.json()["error"]["code"] == 429 and "retry in 2 s" in limited.json()["error"]["message"]
    # Another key is another caller, and the admin routes count against the key that calls them.
    assert [_status(client, "admin", ADMIN) for _ in range(3)] == [200] * 3
    assert _status(client, "user", ADMIN) == 429
    now[0] += 1.0
    limited = client.post("/v1/echo", json={}, headers=_bearer(API))
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    now[0] += 1.0
    assert _status(client, "user", API) == 200  # refilled: one request, not a new burst
    assert _status(client, "user", API) == 429


def test_open_paths_are_never_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, API, None)
    client = TestClient(_app(RateLimitArgs(requests_per_s=0.001, burst=1)))
    assert all(client.get("/healthz").status_code == 200 for _ in range(10))
    assert _status(client, "user", API) == 200 and _status(client, "user", API) == 429


def test_without_keys_the_client_host_is_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, None, None)
    app = _app(RateLimitArgs(requests_per_s=0.001, burst=2))
    first, second = TestClient(app, client=("10.0.0.1", 1)), TestClient(app, client=("10.0.0.2", 1))
    assert [_status(first, "user") for _ in range(3)] == [200, 200, 429]
    assert _status(second, "user") == 200
    assert _status(first, "user", "made-up-key") == 429  # a key nobody configured identifies no one


def test_wrong_keys_count_against_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, API, None)
    client = TestClient(_app(RateLimitArgs(requests_per_s=0.001, burst=2)))
    assert [_status(client, "user", f"guess-{i}") for i in range(3)] == [401, 401, 429]
    assert _status(client, "user", API) == 200  # the key's own bucket


def test_the_rate_limit_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    _keys(monkeypatch, API, None)
    client = TestClient(_app(AppArgs().rate_limit))
    assert all(_status(client, "user", API) == 200 for _ in range(50))


def test_the_limiter_forgets_the_least_recently_seen_caller_and_never_holds_a_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, clock = _clock()
    limiter = RateLimiter(RateLimitArgs(requests_per_s=0.001, burst=1, max_callers=2), clock)
    assert limiter.retry_after_s("a") is None and limiter.retry_after_s("a") == 1000
    assert limiter.retry_after_s("b") is None
    assert limiter.retry_after_s("a") == 1000  # seen again: now the most recent
    assert limiter.retry_after_s("c") is None  # evicts b, the least recently seen
    assert limiter.retry_after_s("a") == 1000
    assert limiter.retry_after_s("b") is None  # forgotten, so a full bucket again

    _keys(monkeypatch, API, ADMIN)
    middleware = GuardMiddleware(_app(), 1024, RateLimitArgs(requests_per_s=1.0))
    assert TestClient(middleware).post("/v1/echo", json={}, headers=_bearer(API)).status_code == 200
    callers = list(middleware.limiter._buckets)
    assert len(callers) == 1 and API not in callers[0]


def test_rate_limit_args_validate() -> None:
    assert AppArgs().rate_limit.requests_per_s is None
    limited = AppArgs.model_validate({"rate_limit": {"requests_per_s": 5, "burst": 10}})
    assert limited.rate_limit.requests_per_s == 5.0 and limited.rate_limit.burst == 10
    for bad in ({"requests_per_s": 0}, {"burst": 0}, {"max_callers": 0}, {"requests_per_s": 1, "bursts": 2}):
        with pytest.raises(ValueError):
            AppArgs.model_validate({"rate_limit": bad})


def test_clip_bounds_and_escapes_client_text() -> None:
    assert clip("device-0") == "device-0"
    forged = "x\n2025-01-01 INFO aiflow_ray: forged\r\x1b[2J\u2028\\"
    out = clip(forged)
    assert not any(c in out for c in "\n\r\x1b\u2028")
    assert out == r"x\n2025-01-01 INFO aiflow_ray: forged\r\x1b[2J\u2028\\"
    long = clip("a" * 10_000)
    assert long.startswith("a" * 80) and len(long) < 120 and "10000 chars" in long
    escaped = clip("\x00" * 100, limit=20)
    assert escaped.startswith(r"\x00" * 5) and len(escaped) < 60  # the limit bounds the escaped text


def test_a_clients_stated_timeout_reaches_the_request_and_a_malformed_one_is_a_400(client: TestClient) -> None:
    def ask(headers: dict[str, str], stream: bool = False) -> tuple[int, dict[str, object]]:
        response = client.post(f"/v1/timeout?stream={str(stream).lower()}", headers={**_bearer(API), **headers})
        return response.status_code, response.json()

    assert ask({}) == (200, {"seconds": None, "first_byte": False})
    assert ask({"X-Request-Timeout-S": "60"}, stream=True) == (200, {"seconds": 60.0, "first_byte": False})
    # The OpenAI SDKs' read timeout bounds a whole non-streamed answer, and only the first token of a stream.
    assert ask({"X-Stainless-Read-Timeout": "600"}) == (200, {"seconds": 600.0, "first_byte": False})
    assert ask({"X-Stainless-Read-Timeout": "600"}, stream=True) == (200, {"seconds": 600.0, "first_byte": True})
    assert ask({"X-Stainless-Read-Timeout": "None"}) == (200, {"seconds": None, "first_byte": False})
    for bad in ("soon", "0", "-5", "nan", "inf", "1e9"):
        status, body = ask({"X-Request-Timeout-S": bad})
        assert status == 400 and body["error"]["param"] == "X-Request-Timeout-S", (bad, body)
    # Each request sees its own: nothing carries over from the one before.
    assert ask({}) == (200, {"seconds": None, "first_byte": False})
