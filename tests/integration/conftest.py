"""A real local Ray cluster (head + device/edge/cloud nodes on 127.0.0.1) serving the tiny profile.

The cluster runs with an API key and an admin key, as a deployment that faces users should: the Ray
processes inherit AIFLOW_API_KEY and AIFLOW_ADMIN_KEY from this process, and every request of the tests
carries one (``api`` the API key, ``admin_api`` the admin key for the admin routes) unless a test is
about leaving it out. The edge and device tiers are pinned to one replica, with room for two requests at
the edge, so that a handful of requests saturates the edge and a replica's counters are the tier's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aiflow_ray import cluster
from aiflow_ray.serve.configs import profile_args

GCS_PORT = 6393
DASHBOARD_PORT = 8267
HTTP_PORT = 8127
APP = "aiflow"
API_KEY = "integration-test-key"
ADMIN_KEY = "integration-admin-key"


@pytest.fixture(scope="session")
def serve_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    os.environ.update(cluster.LOOPBACK_ENV)
    previous = {name: os.environ.get(name) for name in ("AIFLOW_API_KEY", "AIFLOW_ADMIN_KEY")}
    os.environ.update({"AIFLOW_API_KEY": API_KEY, "AIFLOW_ADMIN_KEY": ADMIN_KEY})
    state = tmp_path_factory.mktemp("cluster")
    info = cluster.up(state, gcs_port=GCS_PORT, dashboard_port=DASHBOARD_PORT, cpus_per_node=4)
    try:
        import ray
        from ray import serve

        from aiflow_ray.serve import build_app

        # The driver finds its local raylet through the session's temp dir, which is private here.
        ray.init(address=info.address, _node_ip_address="127.0.0.1", _temp_dir=info.temp_dir, log_to_driver=False)
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        args = profile_args("tiny")
        one = {"min_replicas": 1, "max_replicas": 1}
        args["edge"] = {**args.get("edge", {}), "max_ongoing_requests": 2, "autoscaling": one}
        args["device"] = {**args.get("device", {}), "max_ongoing_requests": 8, "autoscaling": one}
        args["kb"] = {"path": str(state / "kb.sqlite"), "refresh_interval_s": 0.2}  # a knowledge base of its own
        # The 'fast' objective sits well between the large model's latency per token for 12 tokens on a 2 MB/s
        # link (2-3 ms; 8-10 ms when this VM runs 3x slower, as it sometimes does) and on a 10 KB/s one with a
        # 2.4 KB prompt (over 22 ms: its upload alone is 20 ms a token), so a slower CI box cannot blur it.
        args["router"] = {**args.get("router", {}), "fast_slo_s_per_token": 0.014}
        serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{HTTP_PORT}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("the tiny application did not become healthy")
        _wait_for_loads(url)
        yield url
    finally:
        try:
            import ray
            from ray import serve

            if ray.is_initialized():  # else serve.shutdown() would start a local instance
                serve.shutdown()
                ray.shutdown()
        finally:
            cluster.down(Path(state))
            for name, value in previous.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="session")
def api(serve_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def admin_api(serve_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=serve_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def cluster_info(serve_url: str) -> dict[str, str]:
    return {"dashboard": f"http://127.0.0.1:{DASHBOARD_PORT}", "serve_url": serve_url}


def _wait_for_loads(url: str) -> None:
    """The router treats a tier as down until its replicas report; /readyz says when all have."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/readyz", timeout=10)
        if response.status_code == 200:
            return
        time.sleep(1)
    raise RuntimeError(f"tiers never became ready: {response.text}")
