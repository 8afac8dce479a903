"""Bearer auth and the body-size limit of the ingress middleware (an isolated unit: no Ray)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from aiflow_ray.api.app import GuardMiddleware


@pytest.fixture()
def client(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("AIFLOW_API_KEY", "s3cret")
    app = FastAPI()
    app.add_middleware(GuardMiddleware, max_body_bytes=1024)

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received_bytes": len(await request.body())}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return TestClient(app)


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
