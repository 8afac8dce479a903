"""The local cluster on a machine where Ray never ran: Ray's default temp root does not exist there.

CI's machine has run Ray before, so its /tmp/ray is there and would hide the bug; RAY_TMPDIR, which Ray
consults before TMPDIR and /tmp, points Ray's root at a folder that does not exist yet instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiflow_ray import cluster

GCS_PORT = 6397  # apart from the defaults (6390/8265) and from conftest.py's cluster (6393/8267)
DASHBOARD_PORT = 8269

# A driver in a process of its own, so that this one never becomes a Ray driver.
DRIVER = """
import json, sys, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
tiers = sorted(n["Labels"].get("tier", "") for n in ray.nodes() if n["Alive"])
print(json.dumps({"tiers": tiers, "answer": ray.get(ray.remote(lambda: 42).remote())}))
"""


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_cluster_starts_and_stops_where_ray_never_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_root = tmp_path / "never-ran"
    monkeypatch.setenv("RAY_TMPDIR", str(fresh_root))
    for name, value in cluster.LOOPBACK_ENV.items():
        monkeypatch.setenv(name, value)
    state = tmp_path / "state"
    info = None
    try:
        info = cluster.up(state, gcs_port=GCS_PORT, dashboard_port=DASHBOARD_PORT, cpus_per_node=1, timeout_s=240)
        assert info.ready and info.pids
        driver = subprocess.run([sys.executable, "-c", DRIVER, info.address], capture_output=True, text=True,
                                timeout=180, env=os.environ.copy())
        assert driver.returncode == 0, driver.stderr[-3000:]
        assert json.loads(driver.stdout.splitlines()[-1]) == {"tiers": ["cloud", "device", "edge", "head"],
                                                              "answer": 42}
        # The address file went to the cluster's own root, not to the shared one a bare ray.init() reads.
        assert not fresh_root.exists()
        assert (Path(info.temp_dir) / "ray" / "ray_current_cluster").read_text() == info.address
    finally:
        stopped = cluster.down(state)
    assert info is not None
    assert stopped >= len(info.pids)
    assert not cluster.state_file(state).exists()
    assert not Path(info.temp_dir).exists()
    left = [pid for pid in [info.supervisor_pid, *info.pids] if _running(pid)]
    assert left == [] and cluster._processes_under(info.temp_dir) == []
