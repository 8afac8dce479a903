"""Bounded autoscaling load test against a running local cluster (127.0.0.1 only).

    make run PROFILE=tiny
    .venv/bin/python load_tests/autoscale.py --requests 200 --concurrency 8 --max-seconds 120

Sends at most ``--requests`` requests, with ``--concurrency`` in flight, for at most
``--max-seconds``; then waits (bounded) for the tiers to scale back down. It prints the replica
counts it saw per deployment, the latency percentiles and the status codes, and exits non-zero if
no deployment scaled up under load or did not come back down afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

import httpx

DEPLOYMENTS = ("DeviceDrafter", "EdgeVerifier")


def replica_counts(dashboard: str, app: str) -> dict[str, int]:
    from aiflow_ray.cluster import dashboard_headers

    status = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10, headers=dashboard_headers()).json()
    deployments = status["applications"][app]["deployments"]
    return {name: sum(1 for r in info.get("replicas", []) if r.get("state") == "RUNNING")
            for name, info in deployments.items() if name in DEPLOYMENTS}


async def load(url: str, dashboard: str, app: str, total: int, concurrency: int, max_seconds: float
               ) -> tuple[list[float], Counter[int], dict[str, int]]:
    """Drive the load and sample replica counts every second; return the peak counts seen."""
    peak: dict[str, int] = {}
    latencies: list[float] = []
    codes: Counter[int] = Counter()
    deadline = time.monotonic() + max_seconds
    remaining = total
    key = os.environ.get("AIFLOW_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        async def worker() -> None:
            nonlocal remaining
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                started = time.perf_counter()
                body: dict[str, Any] = {"prompt": "def fibonacci(n):", "max_tokens": 32, "path": "device-edge"}
                try:
                    response = await client.post("/v1/generate", json=body)
                    codes[response.status_code] += 1
                except httpx.HTTPError:
                    codes[0] += 1
                latencies.append(time.perf_counter() - started)

        async def poll() -> None:
            while remaining > 0 and time.monotonic() < deadline:
                counts = await asyncio.to_thread(replica_counts, dashboard, app)
                for name, count in counts.items():
                    peak[name] = max(peak.get(name, 0), count)
                await asyncio.sleep(1.0)

        await asyncio.gather(poll(), *(worker() for _ in range(concurrency)))
    return latencies, codes, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265")
    parser.add_argument("--app", default="aiflow")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--scale-down-wait-s", type=float, default=90.0)
    args = parser.parse_args()
    for host in (args.url, args.dashboard):
        if not host.startswith(("http://127.", "http://localhost")):
            parser.error("load tests target this machine only (127.0.0.0/8 or localhost)")
    before = replica_counts(args.dashboard, args.app)
    latencies, codes, during = asyncio.run(
        load(args.url, args.dashboard, args.app, args.requests, args.concurrency, args.max_seconds))
    deadline = time.monotonic() + args.scale_down_wait_s
    after = during
    while time.monotonic() < deadline:
        after = replica_counts(args.dashboard, args.app)
        if after == before:
            break
        time.sleep(2)
    latencies.sort()
    report = {
        "requests": len(latencies), "status_codes": dict(codes),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p99_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "replicas_before": before, "replicas_under_load": during, "replicas_after": after,
    }
    print(json.dumps(report, indent=2))
    scaled_up = any(during.get(d, 0) > before[d] for d in before)
    scaled_down = after == before
    return 0 if scaled_up and scaled_down else 1


if __name__ == "__main__":
    sys.exit(main())
