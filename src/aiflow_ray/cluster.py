"""A real multi-node Ray cluster on one machine, on 127.0.0.1: a head plus one node per tier.

Each worker node carries ``tier=<name>`` so the placement code is the one KubeRay uses. Nodes are
started with Ray's own multi-node helper (``ray.cluster_utils.Cluster``) inside a supervisor process:
``ray start`` either refuses extra nodes on one host (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) or
rewrites 127.0.0.1 to the host's routable address (=1), and every server here must stay on
loopback. ``up`` starts the supervisor and records its PID; ``down`` sends it SIGTERM (it shuts the
nodes down) and then stops, by PID, anything of this cluster that is left. Every process of the cluster
carries ``RAY_TMPDIR=<its temp dir>`` in its environment, which is how ``down`` tells them apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiflow_ray.config import TIERS
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)


# Every node and driver must agree on the auth mode: left unset, Ray enables token auth in whichever
# process happens to find ~/.ray/auth_token, and nodes then refuse each other. Token auth it is: the
# head creates the token if missing, and workers and drivers read it from the same file.
AUTH_ENV = {"RAY_AUTH_MODE": "token"}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **AUTH_ENV}
# Defaults for the local cluster (the caller's environment wins). Serve's controller reconciles every 0.1 s by
# default: on an idle 2-CPU host that loop alone kept 6% of the CPUs busy (the idle cluster's background went
# from 23% to 17.5%, measured 2026-12-07), time taken from every decode. Every 0.5 s is still ten times finer
# than the autoscalers' 5 s delays.
# And Ray starts every worker, so every Serve replica and its engine, at nice 15 below its own daemons (GCS, raylets,
# dashboard, agents, log monitor: nice 0), to keep those responsive under user jobs. Here the replicas' engines are
# the work: at nice 15 every daemon wake-up preempts a decode thread at once, and llama.cpp's other thread waits
# at its barrier, so 2 threads decoded no faster than 1 and a bare llama.cpp beside the idle cluster ran at half
# its idle speed (measured 2026-12-07). Workers at nice 0 share the CPUs as equals with the daemons.
# The tiers' engines, all on this host's CPUs, compute in turns (engines/compute_thread.py).
SMALL_HOST_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_worker_niceness": "0",
                  "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000", "AIFLOW_HOST_COMPUTE_LOCK": "1"}


@dataclass
class ClusterInfo:
    gcs_port: int
    dashboard_port: int
    temp_dir: str
    supervisor_pid: int = 0
    ready: bool = False
    error: str | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


def state_file(state_dir: Path) -> Path:
    return state_dir / "cluster.json"


def _write(state_dir: Path, info: ClusterInfo) -> None:
    tmp = state_file(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info)))
    tmp.replace(state_file(state_dir))


def load(state_dir: Path) -> ClusterInfo | None:
    path = state_file(state_dir)
    return ClusterInfo(**json.loads(path.read_text())) if path.exists() else None


def _processes_under(temp_dir: str) -> list[int]:
    """This cluster's processes, by the environment the supervisor gives them. Not by command line: Ray's
    agents and workers rename themselves (``ray::DashboardAgent``), and outlive a killed supervisor."""
    marker = f"\0RAY_TMPDIR={temp_dir}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in b"\0" + (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def supervisor_alive(info: ClusterInfo) -> bool:
    """Whether the recorded supervisor still runs. Its PID alone says nothing after a reboot or a kill: by
    then it may be another process's."""
    try:
        cmdline = Path(f"/proc/{info.supervisor_pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"\0aiflow_ray.cluster\0" in cmdline and f"\0--gcs-port\0{info.gcs_port}\0".encode() in cmdline


def ensure_auth_token() -> Path:
    """Create Ray's default token file when missing; nodes and drivers all read this one file."""
    path = Path.home() / ".ray" / "auth_token"
    if not path.exists() and not os.environ.get("RAY_AUTH_TOKEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
        log.info("created a Ray auth token at %s", path)
    return path


def dashboard_headers() -> dict[str, str]:
    """Headers for the dashboard's HTTP API, which wants the cluster's token like every other client."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path.home() / ".ray" / "auth_token"
    if not token and path.exists():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _node_env() -> dict[str, str]:
    """The Ray processes' environment: loopback settings, and this interpreter first on PATH, so that a
    ``ray job submit -- python -m aiflow_ray...`` entrypoint runs where aiflow_ray is installed."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        path = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return {**SMALL_HOST_ENV, **os.environ, **LOOPBACK_ENV, "PATH": path}


def up(state_dir: Path, gcs_port: int = 6390, dashboard_port: int = 8265, cpus_per_node: int = 2,
       timeout_s: float = 180.0) -> ClusterInfo:
    state_dir.mkdir(parents=True, exist_ok=True)
    ensure_auth_token()
    if state_file(state_dir).exists():
        raise RuntimeError(f"a cluster is already recorded in {state_file(state_dir)}; run `aiflow cluster down`")
    # Short and private: Ray puts unix sockets under it (path length limits) and we find our PIDs by it.
    temp_dir = f"/tmp/aiflow-ray-{os.getuid()}-{gcs_port}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    info = ClusterInfo(gcs_port, dashboard_port, temp_dir)
    _write(state_dir, info)
    log_path = state_dir / "cluster.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aiflow_ray.cluster", "--state-dir", str(state_dir), "--gcs-port", str(gcs_port),
             "--dashboard-port", str(dashboard_port), "--cpus-per-node", str(cpus_per_node)],
            env=_node_env(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    info.supervisor_pid = proc.pid
    _write(state_dir, info)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = load(state_dir)
        if current and current.ready:
            return current
        if (current and current.error) or proc.poll() is not None:
            down(state_dir)
            raise RuntimeError(f"cluster failed to start: {current.error if current else ''}; see {log_path}")
        time.sleep(0.5)
    down(state_dir)
    raise RuntimeError(f"cluster did not start within {timeout_s:.0f} s; see {log_path}")


def down(state_dir: Path, timeout_s: float = 30.0) -> int:
    """Stop the supervisor (which shuts its nodes down), then any process of this cluster left; return how
    many processes the cluster had. Recorded PIDs are signalled only while they are still this cluster's."""
    info = load(state_dir)
    if info is None:
        return 0
    alive = supervisor_alive(info)
    pids = set(_processes_under(info.temp_dir)) | ({info.supervisor_pid} if alive else set())
    if alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.supervisor_pid, os.WNOHANG)  # reap it when we are its parent
        alive = supervisor_alive(info)
    if alive:
        os.kill(info.supervisor_pid, signal.SIGKILL)
    # Wait for the killed ones too, so that a `make run` right after finds the ports free.
    deadline = time.monotonic() + 10
    while (left := _processes_under(info.temp_dir)) and time.monotonic() < deadline:
        pids.update(left)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    state_file(state_dir).unlink(missing_ok=True)
    shutil.rmtree(info.temp_dir, ignore_errors=True)  # the address file Ray wrote included
    return len(pids)


def _commands_dir(state_dir: Path) -> Path:
    return state_dir / "commands"


NODE_ACTIONS = ("stop", "crash", "start")


def node_command(state_dir: Path, action: str, tier: str, timeout_s: float = 60.0) -> None:
    """Stop (hard: its raylet and workers are killed, as when a machine fails), crash (its raylet alone is
    killed: the workers live on, orphaned, as when the node agent dies) or start the node of ``tier``.

    The supervisor owns the nodes, so the command goes to it as a file; it answers by removing the file
    (or replacing it with an error). For fault drills: `aiflow cluster node stop edge`, then `start`.
    """
    if action not in NODE_ACTIONS or tier not in TIERS:
        raise ValueError(f"node command must be one of {NODE_ACTIONS} for a tier in {TIERS}")
    info = load(state_dir)
    if info is None or not supervisor_alive(info):
        raise RuntimeError("no local cluster is running")
    commands = _commands_dir(state_dir)
    commands.mkdir(parents=True, exist_ok=True)
    path = commands / f"{action}-{tier}.cmd"
    path.write_text(action)
    deadline = time.monotonic() + timeout_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    failed = commands / f"{action}-{tier}.error"
    if failed.exists():
        message = failed.read_text()
        failed.unlink()
        raise RuntimeError(f"could not {action} the {tier} node: {message}")
    if path.exists():
        path.unlink(missing_ok=True)
        raise RuntimeError(f"the supervisor did not {action} the {tier} node within {timeout_s:.0f} s")


def _run_node_commands(state_dir: Path, cluster: Any, nodes: dict[str, Any], common: dict[str, Any]) -> None:
    commands = _commands_dir(state_dir)
    if not commands.is_dir():
        return
    for path in sorted(commands.glob("*.cmd")):
        action, _, tier = path.stem.partition("-")
        try:
            if action == "stop" and tier in nodes:
                log.info("stopping the %s node (hard)", tier)
                cluster.remove_node(nodes.pop(tier), allow_graceful=False)
            elif action == "crash" and tier in nodes:
                log.info("killing the %s node's raylet; its workers live on", tier)
                nodes.pop(tier).kill_raylet()
            elif action == "start" and tier not in nodes:
                log.info("starting a %s node", tier)
                nodes[tier] = cluster.add_node(**common, labels={"tier": tier})
        except Exception as exc:
            (commands / f"{path.stem}.error").write_text(f"{type(exc).__name__}: {exc}")
        path.unlink(missing_ok=True)


def app_status(info: ClusterInfo, app: str) -> tuple[str, str]:
    """Serve's status of one application (NOT_STARTED when Serve does not know it, UNKNOWN when the dashboard
    does not answer) and why: the last line of each failing deployment's error, else the app's message."""
    import httpx

    try:
        response = httpx.get(f"{info.dashboard_url}/api/serve/applications/", headers=dashboard_headers(), timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        return "UNKNOWN", str(exc)
    detail = (response.json().get("applications") or {}).get(app) or {}
    errors: dict[str, list[str]] = {}  # a replica's traceback ends with the exception; often one for all tiers
    for name, deployment in (detail.get("deployments") or {}).items():
        if deployment.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") and deployment.get("message", "").strip():
            errors.setdefault(deployment["message"].strip().splitlines()[-1], []).append(name)
    reason = "; ".join(f"{', '.join(names)}: {error}" for error, names in errors.items())
    return detail.get("status", "NOT_STARTED"), reason or detail.get("message", "")


def _supervise(state_dir: Path, gcs_port: int, dashboard_port: int, cpus_per_node: int) -> None:
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    info = load(state_dir)
    assert info is not None
    common: dict[str, Any] = {"node_ip_address": "127.0.0.1", "num_cpus": cpus_per_node,
                              "object_store_memory": 256 * 1024 * 1024, "temp_dir": info.temp_dir}
    stopping = False

    def on_term(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # Ray's Cluster helper writes its address to <Ray's default temp root>/ray_current_cluster. That folder
    # is missing where Ray never ran; and in the shared root, any bare `ray.init()` on this machine would join
    # this cluster, and another cluster's address there would be overwritten, then deleted. A root of our own
    # (in temp_dir, which `down` removes) avoids all three; every node process inherits it.
    os.environ["RAY_TMPDIR"] = info.temp_dir
    Path(get_default_ray_temp_dir()).mkdir(parents=True, exist_ok=True)
    try:
        cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args={
            **common, "gcs_server_port": gcs_port, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port, "labels": {"tier": "head"},
        })
        nodes: dict[str, Any] = {}
        for tier in TIERS:
            log.info("adding node tier=%s", tier)
            nodes[tier] = cluster.add_node(**common, labels={"tier": tier})
    except Exception as exc:
        info.error = f"{type(exc).__name__}: {exc}"
        _write(state_dir, info)
        raise
    info.ready = True
    info.pids = _processes_under(info.temp_dir)
    _write(state_dir, info)
    log.info("cluster ready at %s, dashboard %s", info.address, info.dashboard_url)
    while not stopping:
        time.sleep(0.5)
        _run_node_commands(state_dir, cluster, nodes, common)
    log.info("shutting the cluster down")
    cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description="supervisor of a local multi-node Ray cluster (internal)")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--gcs-port", type=int, required=True)
    parser.add_argument("--dashboard-port", type=int, required=True)
    parser.add_argument("--cpus-per-node", type=int, required=True)
    args = parser.parse_args()
    _supervise(args.state_dir, args.gcs_port, args.dashboard_port, args.cpus_per_node)


if __name__ == "__main__":
    main()


def wait_for_apps(info: ClusterInfo, url: str, apps: list[tuple[str, str]], timeout_s: float,
                  log_path: Path) -> list[str]:
    """Wait until every ``(name, route prefix)`` application answers ``<prefix>/readyz`` and Serve calls it
    RUNNING; fail as soon as waiting cannot help. Returns the prefixes."""
    import sys
    import urllib.request

    deadline = time.monotonic() + timeout_s
    # /readyz, not /healthz: the ingress answers long before the tiers have loaded their models.
    print(f"waiting for {', '.join(f'{url}{prefix}/readyz' for _, prefix in apps)} (models load in the tier "
          "replicas) ", end="", flush=True, file=sys.stderr)
    pending = list(apps)
    while time.monotonic() < deadline:
        for app, prefix in list(pending):
            try:
                # RUNNING too: while a changed application rolls out, the old replicas still answer ready.
                with urllib.request.urlopen(f"{url}{prefix}/readyz", timeout=5) as response:
                    if response.status == 200 and app_status(info, app)[0] == "RUNNING":
                        pending.remove((app, prefix))
            except OSError:
                pass
        if not pending:
            print(" ready", file=sys.stderr)
            return [prefix for _, prefix in apps]
        failure = None
        if not supervisor_alive(info):
            failure = f"the local cluster stopped while the application was starting; see {log_path}"
        for app, _ in pending:
            if failure is None and (status := app_status(info, app))[0] == "DEPLOY_FAILED":
                failure = (f"the application {app!r} failed to deploy: {status[1]}\n"
                           f"(details: `serve status --address {info.dashboard_url}`)")
        if failure:
            print(" failed", file=sys.stderr)
            raise RuntimeError(failure)
        print(".", end="", flush=True, file=sys.stderr)
        time.sleep(2)
    print(" timed out", file=sys.stderr)
    raise RuntimeError(f"{', '.join(app for app, _ in pending)} did not become healthy within {timeout_s:.0f} s; "
                       f"see `serve status --address {info.dashboard_url}`")
