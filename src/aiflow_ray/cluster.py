"""A real multi-node Ray cluster on one machine, on 127.0.0.1: a head plus one node per tier.

Each worker node carries ``tier=<name>`` so the placement code is the one KubeRay uses. ``up``
records the PIDs of every process that belongs to this cluster (found by its private temp dir) and
``down`` stops exactly those, never other Ray processes on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

TIERS = ("device", "edge", "cloud")


@dataclass
class ClusterInfo:
    gcs_port: int
    dashboard_port: int
    http_port: int
    temp_dir: str
    pids: list[int]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _processes_under(temp_dir: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return sorted(pids)


def state_file(state_dir: Path) -> Path:
    return state_dir / "cluster.json"


def up(state_dir: Path, gcs_port: int = 6390, dashboard_port: int = 8265, http_port: int = 8000,
       cpus_per_node: int = 2) -> ClusterInfo:
    state_dir.mkdir(parents=True, exist_ok=True)
    if state_file(state_dir).exists():
        raise RuntimeError(f"a cluster is already recorded in {state_file(state_dir)}; run `aiflow cluster down`")
    # Short and private: Ray puts unix sockets under it (path length limits) and we find our PIDs by it.
    temp_dir = f"/tmp/aiflow-ray-{os.getuid()}-{gcs_port}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--num-cpus={cpus_per_node}",
              "--disable-usage-stats"]
    head = [_ray_bin(), "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}", "--labels=tier=head", *common]
    log.info("starting Ray head on 127.0.0.1:%d", gcs_port)
    subprocess.run(head, check=True, env=_env(), stdout=subprocess.DEVNULL)
    for tier in TIERS:
        log.info("starting worker node tier=%s", tier)
        subprocess.run([_ray_bin(), "start", f"--address=127.0.0.1:{gcs_port}", f"--labels=tier={tier}", *common],
                       check=True, env=_env(), stdout=subprocess.DEVNULL)
    info = ClusterInfo(gcs_port, dashboard_port, http_port, temp_dir, _processes_under(temp_dir))
    state_file(state_dir).write_text(json.dumps(asdict(info)))
    return info


def load(state_dir: Path) -> ClusterInfo | None:
    path = state_file(state_dir)
    return ClusterInfo(**json.loads(path.read_text())) if path.exists() else None


def down(state_dir: Path, timeout_s: float = 20.0) -> int:
    """Stop every process of the recorded cluster (and workers it spawned since). Returns how many."""
    info = load(state_dir)
    if info is None:
        return 0
    pids = sorted(set(info.pids) | set(_processes_under(info.temp_dir)))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    state_file(state_dir).unlink(missing_ok=True)
    shutil.rmtree(info.temp_dir, ignore_errors=True)
    return len(pids)
