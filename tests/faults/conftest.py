"""A local Ray cluster of its own for fault drills: replicas are killed, a node is stopped and started.

The tiny profile, with two edge and two cloud replicas (a killed one leaves a live one), one device
replica, short deadlines (so a drill takes seconds), an API key and an admin key. The cluster lives
for this package only (these tests kill its parts) and is stopped before the other suites start
theirs. Every drill is bounded: requests have client timeouts, loads a fixed count and duration.

``AIFLOW_FAULT_REPORT=docs/benchmarks/faults.md`` writes what each drill saw (make fault-report).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiflow_ray.serve.configs import profile_args
from tests.served_cluster import APP, served_cluster

GCS_PORT = 6394
DASHBOARD_PORT = 8268
HTTP_PORT = 8128
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"  # named: other clusters may run on this machine
API_KEY = "faults-api-key"
ADMIN_KEY = "faults-admin-key"
CLIENT_TIMEOUT_S = 60.0  # no drill request may take longer: past it, it counts as lost

KB_DOCS = [
    {"source": "tide-notes", "text": "The harbour tide gauge is read every ten minutes. Spring tides at the harbour "
     "reach 4.2 metres; neap tides reach 2.1 metres. The gauge was installed in 1998."},
    {"source": "ferry-notes", "text": "The island ferry leaves the harbour at 7:15 and 16:40 on weekdays. It does "
     "not sail when the wind exceeds 40 knots."},
]


@dataclass
class Outcome:
    """What one client saw."""

    body: dict[str, Any]
    status: int  # 0: no HTTP answer (connection refused or reset)
    elapsed_s: float
    started_at: float
    json: dict[str, Any] = field(default_factory=dict)
    retry_after: str | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def lost(self) -> bool:
        """No complete answer, whatever the reason: a reset or refused connection, no answer within the client's
        timeout, or a 200 whose body never arrived whole. A 503/429 with Retry-After is an answer."""
        return self.status == 0 or (self.status == 200 and not self.json)

    @property
    def retryable(self) -> bool:
        """An explicit, retryable refusal in the API's JSON error shape."""
        return self.status in (429, 503) and self.retry_after is not None and "error" in self.json

    @property
    def token_ids(self) -> list[int]:
        return list(self.json.get("token_ids", []))


class Drill:
    """The faults cluster: an HTTP client, the Ray driver, and tools to break things."""

    def __init__(self, url: str, state_dir: Path, app: str = APP) -> None:
        self.url = url
        self.state_dir = state_dir
        self.app = app  # the Serve application whose replicas this drill breaks
        self.api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                                timeout=CLIENT_TIMEOUT_S)
        self.admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        self.records: list[dict[str, Any]] = []

    # -- requests -------------------------------------------------------------------------------
    def send(self, body: dict[str, Any]) -> Outcome:
        started = time.monotonic()
        try:
            response = self.api.post("/v1/generate", json=body)
        except httpx.HTTPError as exc:
            return Outcome(body, 0, time.monotonic() - started, started, error=type(exc).__name__)
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        return Outcome(body, response.status_code, time.monotonic() - started, started, payload,
                       response.headers.get("retry-after"), "" if payload else response.text[:200])

    def load(self, bodies: list[dict[str, Any]], concurrency: int, fault: Callable[[], Any] | None = None,
             fault_after_s: float = 0.5) -> tuple[list[Outcome], Any, float]:
        """Send ``bodies`` with ``concurrency`` in flight; run ``fault`` ``fault_after_s`` in. Returns the
        outcomes, what ``fault`` returned, and when it ran (monotonic)."""
        fault_result: Any = None
        fault_at = 0.0

        def inject() -> None:
            nonlocal fault_result, fault_at
            time.sleep(fault_after_s)
            fault_at = time.monotonic()
            fault_result = fault() if fault is not None else None

        injector = threading.Thread(target=inject, daemon=True)
        injector.start()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            outcomes = list(pool.map(self.send, bodies))
        injector.join(timeout=60)
        return outcomes, fault_result, fault_at

    def set_link(self, link_id: str, bandwidth_bps: float, rtt_ms: float) -> None:
        response = self.admin.put(f"/v1/admin/links/{link_id}", json={"bandwidth_bps": bandwidth_bps,
                                                                       "rtt_ms": rtt_ms})
        assert response.status_code == 200, response.text

    def router(self) -> dict[str, Any]:
        response = self.api.get("/v1/router")
        assert response.status_code == 200, response.text
        snapshot: dict[str, Any] = response.json()
        return snapshot

    # -- Ray ------------------------------------------------------------------------------------
    def replica_actors(self, deployment: str) -> list[dict[str, Any]]:
        from ray.util.state import list_actors

        name = f"ServeReplica:{self.app}:{deployment}"
        return [a for a in list_actors(address=DASHBOARD, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
                if a.get("class_name") == name]

    def kill_replica(self, deployment: str) -> int:
        """SIGKILL one replica's worker process (as a crash would); returns its PID."""
        actors = self.replica_actors(deployment)
        assert actors, f"no live {deployment} replica"
        pid = int(actors[0]["pid"])
        os.kill(pid, signal.SIGKILL)
        return pid

    def replica_sessions(self, deployment: str = "EdgeVerifier") -> dict[int, int]:
        """Live sessions per replica process (pid), asked of each replica itself: each probe carries a session
        id that the session-affinity router (serve/affinity.py) sends to that very replica."""
        from ray import serve

        from aiflow_ray.serve.affinity import rendezvous_rank

        # Serve names a replica's actor SERVE_REPLICA::<app>#<deployment>#<replica id>.
        ids = [str(a["name"]).rsplit("#", 1)[-1] for a in self.replica_actors(deployment)]
        handle = serve.get_deployment_handle(deployment, app_name=self.app)
        sessions: dict[int, int] = {}
        for replica_id in ids:
            probe = next(f"probe-{i}" for i in itertools.count() if rendezvous_rank(f"probe-{i}", ids)[0] == replica_id)
            stats = handle.options(multiplexed_model_id=probe).stats.remote().result(timeout_s=5)
            sessions[int(stats["pid"])] = int(stats["sessions"] or 0)
        return sessions

    def kill_replica_holding_sessions(self, deployment: str = "EdgeVerifier", min_sessions: int = 1,
                                      timeout_s: float = 20.0) -> int:
        """SIGKILL the first replica seen holding ``min_sessions`` live sessions, so that the kill surely lands
        on requests in flight (a kill at a fixed time can find the replica idle). Returns its PID, 0 if none
        held that many within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                held = self.replica_sessions(deployment)
            except Exception:  # a replica starting or stopping: ask again
                held = {}
            for pid, count in sorted(held.items(), key=lambda kv: -kv[1]):
                if count >= min_sessions:
                    os.kill(pid, signal.SIGKILL)
                    return pid
            time.sleep(0.02)
        return 0

    def kill_proxy(self) -> int:
        from ray.util.state import list_actors

        proxies = [a for a in list_actors(address=DASHBOARD, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
                   if a.get("class_name") == "ProxyActor"]
        assert proxies, "no live proxy"
        pid = int(proxies[0]["pid"])
        os.kill(pid, signal.SIGKILL)
        return pid

    def running(self, deployment: str) -> int:
        from ray import serve

        status = serve.status().applications[self.app].deployments[deployment]
        return int(status.replica_states.get("RUNNING", 0))

    def wait_until(self, what: str, check: Callable[[], bool], timeout_s: float = 180.0) -> float:
        """Poll ``check`` until true; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                if check():
                    return time.monotonic() - started
            except Exception:  # the cluster is recovering: its APIs may fail for a while
                pass
            time.sleep(0.5)
        raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, replicas: dict[str, int], timeout_s: float = 180.0) -> float:
        return self.wait_until(f"replicas {replicas} running and /readyz 200",
                               lambda: all(self.running(d) >= n for d, n in replicas.items()) and self.ready(),
                               timeout_s)

    def record(self, fault: str, outcomes: list[Outcome], recovery_s: float | None, note: str = "") -> None:
        statuses: dict[str, int] = {}
        for o in outcomes:
            key = str(o.status) if o.status else f"no answer ({o.error})"
            statuses[key] = statuses.get(key, 0) + 1
        self.records.append({
            "fault": fault, "requests": len(outcomes), "statuses": statuses,
            "retryable_rejections": sum(o.retryable for o in outcomes),
            "bare_500": sum(o.status == 500 for o in outcomes),
            "lost": sum(o.lost for o in outcomes),
            "max_latency_s": round(max((o.elapsed_s for o in outcomes), default=0.0), 2),
            "recovery_s": None if recovery_s is None else round(recovery_s, 1), "note": note,
        })


def _write_report(records: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "# Fault drills", "",
        "Each drill runs against a local loopback cluster (tiny profile: 2 edge, 2 cloud, 1 device replica; "
        "deadlines: edge call 5 s, router 1 s, link outage 1 s). Reproduce: `make fault-report`.",
        f"Run on {time.strftime('%Y-%m-%d')}.", "",
        "| fault | requests | what the clients saw | retryable 503/429 | bare 500 | lost | slowest (s) "
        "| recovery (s) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        recovery = r["recovery_s"] if r["recovery_s"] is not None else "-"
        lines.append(f"| {r['fault']} | {r['requests']} | {seen} | {r['retryable_rejections']} | {r['bare_500']} "
                     f"| {r['lost']} | {r['max_latency_s']} | {recovery} | {r['note']} |")
    lines += ["", "Lost: the client got no complete answer, whatever the reason (a reset or refused connection, no "
              f"answer within {CLIENT_TIMEOUT_S:.0f} s, a body cut short); a 503/429 with Retry-After is an answer.",
              "", "Recovery: from the fault until the cluster answered as before "
              "(replicas back and /readyz 200, "
              "or the first 200 after a proxy restart).", ""]
    path.write_text("\n".join(lines))
    path.with_suffix(".json").write_text(json.dumps(records, indent=2) + "\n")


@pytest.fixture(scope="package")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    state = tmp_path_factory.mktemp("faults-cluster")
    args = profile_args("tiny")
    two = {"min_replicas": 2, "max_replicas": 2}
    args["edge"] = {**args.get("edge", {}), "autoscaling": two}
    args["cloud"] = {**args.get("cloud", {}), "autoscaling": two}
    args["device"] = {**args.get("device", {}), "max_ongoing_requests": 16,
                      "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    args["kb"] = {"path": str(state / "kb.sqlite"), "refresh_interval_s": 0.2}
    args["deadlines"] = {"request_s": 45, "edge_call_s": 5, "cloud_call_s": 10, "router_call_s": 1,
                         "link_outage_s": 1}
    keys = {"AIFLOW_API_KEY": API_KEY, "AIFLOW_ADMIN_KEY": ADMIN_KEY}
    with served_cluster(state, GCS_PORT, DASHBOARD_PORT, HTTP_PORT, keys, args) as url:
        drill_obj = Drill(url, state)
        try:
            drill_obj.wait_until("the application answering /readyz", drill_obj.ready, 300)
            response = drill_obj.admin.post("/v1/admin/kb/documents", json={"documents": KB_DOCS})
            assert response.status_code == 200, response.text
            yield drill_obj
        finally:
            report = os.environ.get("AIFLOW_FAULT_REPORT")
            if report and drill_obj.records:
                _write_report(drill_obj.records, Path(report))
