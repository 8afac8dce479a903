"""A real local Ray cluster (head + device/edge/cloud nodes on 127.0.0.1) serving the tiny profile.

The cluster runs with an API key and an admin key, as a deployment that faces users should: the Ray
processes inherit AIFLOW_API_KEY and AIFLOW_ADMIN_KEY from this process, and every request of the tests
carries one (``api`` the API key, ``admin_api`` the admin key for the admin routes) unless a test is
about leaving it out. The edge and device tiers are pinned to one replica, with room for two requests at
the edge, so that a handful of requests saturates the edge and a replica's counters are the tier's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aiflow_ray.serve.configs import serve_config
from tests.served_cluster import served_cluster

GCS_PORT = 6393
DASHBOARD_PORT = 8267
HTTP_PORT = 8127
API_KEY = "integration-test-key"
ADMIN_KEY = "integration-admin-key"


@pytest.fixture(scope="session")
def kb_snapshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kb-snapshots")


@pytest.fixture(scope="session")
def serve_url(tmp_path_factory: pytest.TempPathFactory, kb_snapshots: Path) -> Iterator[str]:
    state = tmp_path_factory.mktemp("cluster")
    args = serve_config("tiny")["applications"][0]["args"]  # as `make run PROFILE=tiny` serves it
    one = {"min_replicas": 1, "max_replicas": 1}
    args["edge"] = {**args.get("edge", {}), "max_ongoing_requests": 2, "autoscaling": one}
    args["device"] = {**args.get("device", {}), "max_ongoing_requests": 8, "autoscaling": one}
    # A knowledge base of its own, kept as versioned snapshots, as a cluster on several machines keeps it.
    args["kb"] = {"snapshots_dir": str(kb_snapshots), "refresh_interval_s": 0.2}
    # The 'fast' objective sits well between the large model's latency per token for 12 tokens of a 2.4 KB
    # (1600-token) prompt on a 2 MB/s link (17 ms, its prefill's 0.1 s included; about 50 ms when this VM runs
    # 3x slower, as it sometimes does) and on a 2 KB/s one (over 100 ms: the upload alone is 100 ms a token),
    # so a slower CI box cannot blur it. The device answers such a request at 4-12 ms a token.
    args["router"] = {**args.get("router", {}), "fast_slo_s_per_token": 0.06}
    keys = {"AIFLOW_API_KEY": API_KEY, "AIFLOW_ADMIN_KEY": ADMIN_KEY}
    with served_cluster(state, GCS_PORT, DASHBOARD_PORT, HTTP_PORT, keys, args) as url:
        wait_for_200(f"{url}/healthz", 300, "the tiny application did not become healthy")
        _wait_for_loads(url)
        yield url


def wait_for_200(url: str, timeout_s: float, failure: str) -> None:
    """Poll ``url`` until it answers 200 (a starting application refuses connections or answers 5xx)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(failure)


@pytest.fixture(scope="session")
def api(serve_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def admin_api(serve_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def cluster_info(serve_url: str, kb_snapshots: Path) -> dict[str, str]:
    return {"dashboard": f"http://127.0.0.1:{DASHBOARD_PORT}", "serve_url": serve_url,
            "kb_snapshots": str(kb_snapshots)}


def _wait_for_loads(url: str) -> None:
    """The router treats a tier as down until its replicas report; /readyz says when all have."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/readyz", timeout=10)
        if response.status_code == 200:
            return
        time.sleep(1)
    raise RuntimeError(f"tiers never became ready: {response.text}")
