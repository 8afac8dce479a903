"""The recorded local cluster without Ray: stale records, reused PIDs, and what `aiflow cluster` says."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aiflow_ray import cli, cluster

SLEEP = [sys.executable, "-c", "import time; print(flush=True); time.sleep(60)"]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the CLI keeps its state in ./.aiflow
    return tmp_path


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        proc.stdout.readline()  # it runs: /proc shows its command line and environment only after exec is done
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _record(workdir: Path, supervisor_pid: int, pids: list[int]) -> cluster.ClusterInfo:
    info = cluster.ClusterInfo(6397, 8269, str(workdir / "ray-temp"), supervisor_pid, True, None, pids)
    Path(info.temp_dir).mkdir()
    cli.STATE_DIR.mkdir()
    cluster._write(cli.STATE_DIR, info)
    return info


def test_down_with_nothing_recorded(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["cluster", "down"]) == 0
    assert capsys.readouterr().out == "no local cluster is running\n"


def test_stale_record_is_cleared_by_pid_sparing_reused_pids(
    workdir: Path, spawn: Callable[..., subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    temp_dir = workdir / "ray-temp"
    # A node process the killed supervisor left behind, and a stranger that got a PID the record names.
    left_over = spawn(SLEEP, env={**os.environ, "RAY_TMPDIR": str(temp_dir)})
    stranger = spawn(SLEEP)
    info = _record(workdir, stranger.pid, [stranger.pid, left_over.pid])
    assert not cluster.supervisor_alive(info)

    assert cli.main(["cluster", "down"]) == 0
    assert capsys.readouterr().out == (f"found a stale cluster record (its supervisor, PID {stranger.pid}, is gone); "
                                       "stopped 1 processes left of it\n")
    assert left_over.wait(timeout=10) == -9
    assert stranger.poll() is None
    assert not cluster.state_file(cli.STATE_DIR).exists() and not temp_dir.exists()


def test_up_when_the_cluster_runs(
    workdir: Path, spawn: Callable[..., subprocess.Popen[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    supervisor = spawn([*SLEEP, "-m", "aiflow_ray.cluster", "--gcs-port", "6397"])  # a supervisor's command line
    info = _record(workdir, supervisor.pid, [])
    assert cluster.supervisor_alive(info)

    assert cli.main(["cluster", "up", "--gcs-port", "6397", "--dashboard-port", "8269"]) == 0
    assert capsys.readouterr().out == "cluster already running at 127.0.0.1:6397 (dashboard http://127.0.0.1:8269)\n"
    assert cli.main(["cluster", "up"]) == 1  # other ports: not the cluster asked for
    assert "already running at 127.0.0.1:6397" in capsys.readouterr().err

    assert cli.main(["cluster", "down"]) == 0
    assert capsys.readouterr().out == "stopped 1 processes\n"
    assert not Path(f"/proc/{supervisor.pid}").exists() or supervisor.poll() is not None
    assert not cluster.state_file(cli.STATE_DIR).exists()
