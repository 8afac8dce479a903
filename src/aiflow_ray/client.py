"""A small client for the aiflow HTTP API, used by jobs and benchmarks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from aiflow_ray import envs


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class AiflowClient:
    """Keys default to AIFLOW_API_KEY and AIFLOW_ADMIN_KEY; the admin key, when there is one, also
    serves the user routes, so a client holding only that key works throughout."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 600.0,
                 admin_key: str | None = None):
        self.admin_key = admin_key if admin_key is not None else envs.admin_key()
        key = api_key if api_key is not None else envs.api_key() or self.admin_key
        self.http = httpx.Client(base_url=url, headers=auth_headers(key), timeout=timeout_s)

    def generate(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/v1/generate", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        out: dict[str, Any] = response.json()
        return out

    def stream_generate(self, **body: Any) -> Iterator[tuple[float, dict[str, Any]]]:
        """The events of a streamed ``/v1/generate``, each with its arrival time (``time.perf_counter``)."""
        with self.http.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                yield time.perf_counter(), event

    def set_link(self, link_id: str, bandwidth_bps: float, rtt_ms: float) -> None:
        # Admin routes refuse the API key: send the admin key instead of the client's default header.
        self.http.put(f"/v1/admin/links/{link_id}", json={"bandwidth_bps": bandwidth_bps, "rtt_ms": rtt_ms},
                      headers=auth_headers(self.admin_key)).raise_for_status()

    def router(self) -> dict[str, Any]:
        out: dict[str, Any] = self.http.get("/v1/router").json()
        return out
