"""A small client for the aiflow HTTP API, used by jobs and benchmarks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from aiflow_ray import envs


class AiflowClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout_s: float = 600.0):
        key = api_key if api_key is not None else envs.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

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
        self.http.put(f"/v1/admin/links/{link_id}", json={"bandwidth_bps": bandwidth_bps, "rtt_ms": rtt_ms}
                      ).raise_for_status()

    def router(self) -> dict[str, Any]:
        out: dict[str, Any] = self.http.get("/v1/router").json()
        return out
