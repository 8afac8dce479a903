"""The knowledge base as a cluster keeps it: a Ray job ingests through Ray Data into a new snapshot version,
and the running cloud replica swaps it in while searches keep arriving, none of them failing.

The served cluster (conftest.py) keeps its knowledge base as versioned snapshots (rag/snapshots.py). The job
is submitted as the KubeRay ingestion RayJob submits it (k8s/), with ``ray job submit`` to the dashboard.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from aiflow_ray.rag.snapshots import SnapshotStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TOPICS = ["routing tables", "cache eviction", "write-ahead logging", "vector clocks", "bloom filters",
          "consistent hashing", "lock-free queues", "copy-on-write pages", "token buckets", "gossip membership"]


def _corpus(path: Path) -> Path:
    lines = [{"source": f"corpus:{i}", "title": topic,
              "text": f"Notes on {topic}, part {i}. " + f"{topic.capitalize()} appear in systems design. " * 12}
             for i, topic in enumerate(TOPICS * 4)]
    lines.append({"source": "corpus:zorblax", "title": "Zorblax handshake",
                  "text": "The Zorblax handshake exchanges three nonces before any session key is derived."})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_a_ray_data_ingestion_job_publishes_a_version_the_cloud_replica_swaps_in_without_failing_a_request(
        api: httpx.Client, cluster_info: dict[str, str], tmp_path: Path) -> None:
    store = SnapshotStore(Path(cluster_info["kb_snapshots"]))
    before = store.latest_version()
    statuses: list[int] = []
    seen_versions: list[int] = []
    stop = threading.Event()

    def searches() -> None:
        with httpx.Client(base_url=cluster_info["serve_url"], headers=api.headers, timeout=60) as client:
            while not stop.is_set():
                response = client.post("/v1/kb/search", json={"query": "Zorblax handshake nonces", "top_k": 1})
                statuses.append(response.status_code)
                seen_versions.append(client.get("/v1/kb").json().get("serving_version", -1))

    reader = threading.Thread(target=searches)
    reader.start()
    try:
        ray_cli = str(Path(sys.executable).parent / "ray")
        corpus = _corpus(tmp_path / "corpus.jsonl")
        entrypoint = f"python -m aiflow_ray.jobs.ingest --snapshots {store.root} --input {corpus} --actors 2"
        entrypoint += " --batch-size 8"
        done = subprocess.run([ray_cli, "job", "submit", "--address", cluster_info["dashboard"], "--",
                               *entrypoint.split()], capture_output=True, text=True, timeout=420)
        output = done.stdout + done.stderr
        assert done.returncode == 0 and "succeeded" in output.lower(), output[-4000:]
        summary, _ = json.JSONDecoder().raw_decode(output[output.rindex('{\n  "version"'):])
        assert summary["version"] == before + 1 and summary["added"] == 41 and summary["chunks_embedded"] >= 41
        assert store.latest_version() == before + 1
        store.verify(before + 1)

        def swapped() -> list[dict] | None:
            hits = api.post("/v1/kb/search", json={"query": "Zorblax handshake nonces", "top_k": 1}).json()["hits"]
            return hits if hits and hits[0]["source"] == "corpus:zorblax" else None

        deadline = time.monotonic() + 30
        while not swapped():
            assert time.monotonic() < deadline, "the cloud replica never served the new version"
            time.sleep(0.3)
        time.sleep(1.0)  # searches continue on the new version for a while
    finally:
        stop.set()
        reader.join(timeout=60)
    assert len(statuses) > 5 and set(statuses) == {200}, sorted(set(statuses))
    assert seen_versions[-1] == before + 1 and min(seen_versions) <= before  # it served both sides of the swap
    stats = api.get("/v1/kb").json()
    assert (stats["store"], stats["version"], stats["serving_version"]) == ("snapshots", before + 1, before + 1)
