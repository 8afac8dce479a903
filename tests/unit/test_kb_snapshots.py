"""Versioned read-only knowledge-base snapshots (rag/snapshots.py): publication, races, swap, prune, rollback.

The real embedder and real SQLite files; several writers and readers are separate store objects, as
separate pods would be. The Ray Data ingestion into a served cluster is in
tests/integration/test_kb_cluster.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from aiflow_ray.rag.retriever import Retriever
from aiflow_ray.rag.snapshots import DB_NAME, EmbeddingCache, SnapshotStore
from aiflow_ray.rag.store import Document, IngestError
from tests.unit.test_rag import DOCS

NEW = Document("test:raft", "Raft elects a leader by randomized election timeouts and majority votes.", "raft")


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    from aiflow_ray.rag.embedder import Embedder

    return EmbeddingCache.around(Embedder())  # shared by the tests: each text is embedded once


def test_each_ingestion_publishes_one_complete_immutable_version(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    store = SnapshotStore(tmp_path / "kb", chunk_chars=200, overlap_chars=40)
    assert store.latest_version() == 0 and store.open_latest().stats()["chunks"] == 0  # replicas start empty
    stats, version = store.ingest(DOCS, embedder)
    assert (version, stats.added, store.versions()) == (1, 4, [1])
    again, same = store.ingest(DOCS, embedder)
    assert (same, again.unchanged, store.versions()) == (1, 4, [1])  # nothing changed: nothing published
    changed = Document("test:gc", "Garbage collectors find unreachable objects and free them.", "gc")
    stats, version = store.ingest([changed, NEW], embedder)
    assert (version, stats.replaced, stats.added) == (2, 1, 1)
    manifest = store.manifest(2)
    assert (manifest["parent"], manifest["documents"], manifest["chunks"]) == (1, 5, 5)
    # Every published directory holds exactly the file and its manifest: no journal or WAL files beside it,
    # and the bytes are the ones the manifest names.
    for v in (1, 2):
        assert sorted(p.name for p in (tmp_path / "kb" / f"v{v:06d}").iterdir()) == ["MANIFEST.json", DB_NAME]
        store.verify(v)
    old, new = store.open_version(1), store.open_version(2)
    assert old.stats()["documents"] == 4 and new.stats()["documents"] == 5 and new.version() == 2
    (row,) = new.lexical("unreachable objects", 1)
    assert "unreachable" in new.chunks_by_row([row])[row][2]  # the lexical index came with the file
    with pytest.raises(IngestError, match="read-only"):
        new.ingest([NEW], embedder)
    assert not list((tmp_path / "kb").glob(".staging-*"))


def test_a_writer_that_loses_the_race_reapplies_its_documents_on_the_winners_version(
        tmp_path: Path, embedder, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "kb"
    first, second = SnapshotStore(root), SnapshotStore(root)  # two pods
    second.ingest(DOCS[:2], embedder)
    publish = first._publish
    calls: list[int] = []

    def other_writer_wins_first(db: Path, base: int, counts: dict, restored_from: int | None = None) -> int:  # type: ignore[type-arg]
        if not calls:  # the other pod publishes between this one's ingestion and its rename
            second.ingest([NEW], embedder)
        calls.append(base)
        return publish(db, base, counts, restored_from)

    monkeypatch.setattr(first, "_publish", other_writer_wins_first)
    stats, version = first.ingest(DOCS[2:], embedder)
    assert calls == [1, 2] and version == 3 and stats.added == 2
    latest = first.open_latest().stats()
    assert latest["documents"] == 5  # both writers' documents, neither lost
    assert [first.manifest(v)["parent"] for v in (1, 2, 3)] == [None, 1, 2]


def test_a_retriever_swaps_new_versions_in_while_queries_keep_answering(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "kb"
    SnapshotStore(root).ingest(DOCS, embedder)
    retriever = Retriever(SnapshotStore(root), embedder, refresh_interval_s=0.02)
    assert retriever.version == 1
    errors: list[BaseException] = []
    answered = []
    stop = threading.Event()
    first_answer = threading.Event()

    def queries() -> None:
        while not stop.is_set():
            try:
                hits = retriever.search("leader election", top_k=2)
                answered.append((retriever.version, hits[0].source))
                first_answer.set()
            except BaseException as exc:  # any failure at all is what this test looks for
                errors.append(exc)
                first_answer.set()

    reader = threading.Thread(target=queries)
    reader.start()
    try:
        # The writer starts only once the reader has answered from version 1: on a loaded host the thread
        # may otherwise first run after the swaps, and the test would not see the "before".
        assert first_answer.wait(timeout=30)
        writer = SnapshotStore(root)  # another pod
        for i in range(4):
            writer.ingest([Document(f"extra:{i}", f"Note {i} on consensus and replicated logs, number {i}.")], embedder)
        writer.ingest([NEW], embedder)
        deadline = time.monotonic() + 20
        while retriever.version != 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        stop.set()
        reader.join(timeout=30)
    assert errors == [] and retriever.version == 6
    assert answered and answered[-1] == (6, "test:raft")
    assert {v for v, _ in answered} >= {1, 6}  # it answered before and after the swaps


def test_prune_waits_out_the_grace_period_and_rollback_publishes_an_old_version_again(
        tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    store = SnapshotStore(tmp_path / "kb")
    for doc in (*DOCS, NEW):
        store.ingest([doc], embedder)
    assert store.versions() == [1, 2, 3, 4, 5]
    assert store.prune(keep=2, grace_s=600) == []  # superseded moments ago: a replica may still read them
    future = time.time() + 3600
    assert store.prune(keep=2, grace_s=600, now=future) == [1, 2, 3] and store.versions() == [4, 5]
    version = store.rollback(4)
    assert version == 6 and store.manifest(6)["restored_from"] == 4
    assert store.open_latest().stats()["documents"] == 4 and store.versions() == [4, 5, 6]
    # A reader keeps serving a version pruned under it (replicas never depend on the grace period to read).
    serving = store.open_version(4)
    assert store.prune(keep=1, grace_s=0) == [4, 5]
    assert serving.stats()["documents"] == 4 and serving.lexical("leader", 1) == []
    with pytest.raises(IngestError, match="no published version 1"):
        store.rollback(1)
    stale = tmp_path / "kb" / ".staging-dead"
    stale.mkdir()
    store.prune(keep=3, grace_s=600, now=time.time() + 7200)  # its writer died an hour or more ago
    assert not stale.exists()
    # A version directory whose file was cut short is refused, naming it, not served.
    db = tmp_path / "kb" / "v000006" / DB_NAME
    db.write_bytes(db.read_bytes()[:4096])
    with pytest.raises(IngestError, match="manifest says"):
        store.open_version(6)
    assert json.loads((tmp_path / "kb" / "v000006" / "MANIFEST.json").read_text())["version"] == 6


def test_the_cli_ingests_into_snapshots_lists_rolls_back_and_prunes(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from aiflow_ray.cli import main

    root = tmp_path / "kb"
    (tmp_path / "a.md").write_text("Raft elects a leader with randomized timeouts.")
    (tmp_path / "b.md").write_text("Paxos reaches consensus with proposers and acceptors.")
    assert main(["kb", "--snapshots", str(root), "ingest", str(tmp_path / "a.md")]) == 0
    assert main(["kb", "--snapshots", str(root), "ingest", str(tmp_path / "b.md")]) == 0
    capsys.readouterr()
    assert main(["kb", "--snapshots", str(root), "versions"]) == 0
    assert [m["documents"] for m in json.loads(capsys.readouterr().out)] == [1, 2]
    assert main(["kb", "--snapshots", str(root), "rollback", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"published": 3}
    assert main(["kb", "--snapshots", str(root), "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 1
    assert main(["kb", "--snapshots", str(root), "search", "leader election", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["source"].endswith("a.md")
    assert main(["kb", "--snapshots", str(root), "prune", "--keep", "1", "--grace-s", "0"]) == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": [1, 2]}
    assert main(["kb", "--snapshots", str(root), "rollback", "1"]) == 2
    assert "no published version 1" in capsys.readouterr().err
    assert main(["kb", "--kb", str(tmp_path / "kb.sqlite"), "versions"]) == 2
    assert "--snapshots" in capsys.readouterr().err


def test_a_cloud_replica_reads_its_own_ingestion_at_once_and_keeps_versions_bounded(tmp_path: Path,
                                                                                     embedder) -> None:  # type: ignore[no-untyped-def]
    from aiflow_ray.config import KbArgs
    from aiflow_ray.tiers.cloud import CloudService, IngestRequest, RetrieveRequest

    args = KbArgs(snapshots_dir=str(tmp_path / "kb"), snapshots_keep=2, snapshots_grace_s=0, refresh_interval_s=60)
    cloud = CloudService(engine=None, kb_args=args, embedder=embedder)  # type: ignore[arg-type]  # retrieval only
    other = CloudService(engine=None, kb_args=args, embedder=embedder)  # type: ignore[arg-type]  # another pod
    for i, doc in enumerate((*DOCS, NEW), start=1):
        out = cloud.ingest(IngestRequest(documents=({"source": doc.source, "text": doc.text, "title": doc.title},)))
        assert out["version"] == i and cloud.stats()["serving_version"] == i  # no wait for its own write
        assert len(SnapshotStore(tmp_path / "kb").versions()) <= 2
    hits = cloud.retrieve(RetrieveRequest(query="leader election", top_k=1)).hits
    assert hits[0].source == "test:raft" and cloud.stats()["store"] == "snapshots"
    assert other.stats()["serving_version"] == 0  # the other replica moves on at its next refresh
    other.retriever.refresh_now()
    assert other.retrieve(RetrieveRequest(query="leader election", top_k=1)).hits[0].source == "test:raft"


@pytest.mark.parametrize("source", ["snapshots", "live-file"])
def test_an_idle_retriever_swaps_a_new_version_in_before_its_next_query(
        tmp_path: Path, embedder, source: str) -> None:  # type: ignore[no-untyped-def]
    """No query in between: the next query must not be answered from the version before the ingestion."""
    from aiflow_ray.rag.store import KnowledgeBase

    if source == "snapshots":
        reader_source, writer = SnapshotStore(tmp_path / "kb"), SnapshotStore(tmp_path / "kb")
    else:
        reader_source, writer = KnowledgeBase(tmp_path / "kb.sqlite"), KnowledgeBase(tmp_path / "kb.sqlite")
    retriever = Retriever(reader_source, embedder, refresh_interval_s=0.05)
    try:
        assert retriever.num_chunks == 0
        writer.ingest(DOCS, embedder)
        deadline = time.monotonic() + 10
        while retriever.num_chunks == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert retriever.num_chunks > 0, "an idle retriever kept serving the version before the ingestion"
        assert retriever.search("garbage collection", top_k=2)
    finally:
        retriever.close()
