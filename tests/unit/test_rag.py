"""Knowledge base: chunking, file reading, idempotent ingestion, search with the real embedder."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aiflow_ray.rag.chunking import chunk_text
from aiflow_ray.rag.corpora import parse_foldoc, pydoc_documents
from aiflow_ray.rag.index import ExactIndex, HnswIndex
from aiflow_ray.rag.retriever import Retriever
from aiflow_ray.rag.store import Document, IngestError, KnowledgeBase, QueryError, read_documents

DOCS = [
    Document("test:tcp", "TCP is a connection-oriented transport protocol that retransmits lost packets.", "tcp"),
    Document("test:quicksort", "Quicksort sorts an array by partitioning it around a pivot element.", "quicksort"),
    Document("test:gc", "Garbage collection reclaims memory that the program can no longer reach.", "gc"),
    Document("test:with", "The with statement calls __enter__ on entry and __exit__ when the block ends.", "with"),
]


@pytest.fixture(scope="module")
def embedder():  # type: ignore[no-untyped-def]
    from aiflow_ray.rag.embedder import Embedder

    return Embedder()


def _shared_prefix_len(previous: str, following: str) -> int:
    """Length of the longest end of ``previous`` that ``following`` starts with."""
    return max((n for n in range(1, min(len(previous), len(following)) + 1)
                if previous.endswith(following[:n])), default=0)


def test_chunks_respect_the_size_and_overlap() -> None:
    text = "\n\n".join(f"Paragraph {i}. " + " ".join(f"word{i}_{j}" for j in range(30)) for i in range(20))
    chunks = chunk_text(text, max_chars=400, overlap_chars=120)
    assert all(len(c) <= 400 for c in chunks) and len(chunks) > 5
    words = {w for w in text.split()}
    assert words <= {w for c in chunks for w in c.split()}  # nothing lost
    overlaps = [_shared_prefix_len(chunks[i], chunks[i + 1]) for i in range(len(chunks) - 1)]
    assert min(overlaps) >= 60 and max(overlaps) <= 120  # each chunk opens with the end of the last
    assert chunk_text("x" * 5000, 500, 100)[0] == "x" * 399  # a word longer than a chunk is cut


def test_reading_files_and_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\nSome text.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"source": "s:1", "text": "hello", "title": "t"}) + "\n\n")
    docs = list(read_documents(tmp_path))
    assert [d.source for d in docs] == [f"file:{(tmp_path / 'a.md').resolve()}", "s:1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
    with pytest.raises(IngestError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_documents(bad))
    bad.write_text(json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(IngestError, match=r"bad\.jsonl:1: .*'text'"):
        list(read_documents(bad))
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(IngestError, match=r"unsupported file type \.pdf"):
        list(read_documents(tmp_path / "x.pdf"))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(IngestError, match="not UTF-8"):
        list(read_documents(tmp_path / "latin.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(IngestError, match="empty file"):
        list(read_documents(tmp_path / "empty.txt"))
    with pytest.raises(IngestError, match="no such file"):
        list(read_documents(tmp_path / "missing.txt"))


def test_foldoc_dictd_parsing_keeps_one_document_per_definition() -> None:
    body = b"tcp\nTransmission Control Protocol\n\n   <networking> A transport.\nping\n\n   A probe.\n"
    first, second = body.index(b"ping"), len(body)

    def b64(n: int) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        out = ""
        while True:
            out = alphabet[n % 64] + out
            n //= 64
            if not n:
                return out

    index = (f"00databaseinfo\tA\tB\nping\t{b64(first)}\t{b64(second - first)}\n"
             f"tcp\tA\t{b64(first)}\ntransmission control protocol\tA\t{b64(first)}\n").encode()
    docs = list(parse_foldoc(index, body))
    assert [d["source"] for d in docs] == ["foldoc:ping", "foldoc:tcp"]
    assert docs[1]["text"].startswith("tcp\nTransmission")


def test_pydoc_topics_are_a_corpus() -> None:
    docs = {d["source"]: d for d in pydoc_documents()}
    assert "pydoc:with" in docs and "__enter__" in docs["pydoc:with"]["text"]


def test_exact_and_hnsw_agree_on_neighbours() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:20] + 0.01 * rng.normal(size=(20, 32)).astype(np.float32)
    exact_ids, exact_scores = ExactIndex(vectors).search(queries, 5)
    hnsw_ids, _ = HnswIndex(vectors).search(queries, 5)
    assert (exact_ids[:, 0] == np.arange(20)).all() and (np.diff(exact_scores, axis=1) <= 0).all()
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact_ids, hnsw_ids, strict=True)]) > 0.9
    ids, scores = ExactIndex(vectors[:3]).search(queries[:1], 5)  # fewer rows than k
    assert ids[0].tolist()[3:] == [-1, -1] and np.isinf(scores[0, 3:]).all()


def test_ingest_is_idempotent_and_search_finds_the_right_source(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    kb = KnowledgeBase(tmp_path / "kb.sqlite", chunk_chars=200, overlap_chars=40)
    first = kb.ingest(DOCS, embedder)
    assert (first.added, first.chunks_added) == (4, 4)
    again = kb.ingest(DOCS, embedder)
    assert (again.unchanged, again.chunks_added) == (4, 0) and kb.stats()["chunks"] == 4
    changed = kb.ingest([Document("test:gc", "Garbage collectors find unreachable objects and free them.", "gc")],
                        embedder)
    assert (changed.replaced, changed.chunks_removed, changed.chunks_added) == (1, 1, 1)
    assert kb.stats()["chunks"] == 4 and kb.stats()["documents"] == 4
    retriever = Retriever(kb, embedder)
    hits = retriever.search("which protocol resends lost packets?", top_k=2)
    assert hits[0].source == "test:tcp" and hits[0].chunk_id == "test:tcp#0" and hits[0].score > hits[1].score
    assert retriever.search("sorting with a pivot", top_k=1)[0].source == "test:quicksort"
    kb.ingest([Document("test:name", "Qwzx7 is the codename of the replication layer.", "codename")], embedder)
    fresh = Retriever(kb, embedder)
    assert fresh.search("qwzx7", top_k=1)[0].source == "test:name"  # the lexical half matches the rare token
    assert len({h.source for h in fresh.search("memory", top_k=5)}) == len(fresh.search("memory", top_k=5))
    for query, top_k, message in (("   ", 3, "empty"), ("x" * 5000, 3, "longer"), ("ok", 0, "top_k")):
        with pytest.raises(QueryError, match=message):
            retriever.search(query, top_k=top_k)


def test_queries_keep_answering_while_another_writer_ingests(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "kb.sqlite"
    KnowledgeBase(path).ingest(DOCS, embedder)
    retriever = Retriever(KnowledgeBase(path), embedder, refresh_interval_s=0.05)
    extra = [Document(f"extra:{i}", f"Note {i} about distributed systems and consensus protocol number {i}.")
             for i in range(300)]
    writer = threading.Thread(target=lambda: KnowledgeBase(path).ingest(extra, embedder, batch_documents=50))
    writer.start()
    latencies = []
    while writer.is_alive():
        started = time.perf_counter()
        assert retriever.search("transport protocol", top_k=3)  # never blocks on the writer, never fails
        latencies.append(time.perf_counter() - started)
    writer.join()
    assert max(latencies) < 5.0
    deadline = time.monotonic() + 10
    while retriever.num_chunks < 304 and time.monotonic() < deadline:
        retriever.search("consensus", top_k=1)  # the refresh swaps a new snapshot in behind the queries
        time.sleep(0.05)
    assert retriever.num_chunks == 304


def test_kb_cli_ingests_searches_and_refuses_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aiflow_ray.cli import main

    kb = tmp_path / "kb.sqlite"
    notes = tmp_path / "notes.jsonl"
    notes.write_text("".join(json.dumps({"source": d.source, "text": d.text, "title": d.title}) + "\n" for d in DOCS))
    assert main(["kb", "--kb", str(kb), "ingest", str(notes)]) == 0
    assert json.loads(capsys.readouterr().out)["chunks_added"] == 4
    assert main(["kb", "--kb", str(kb), "ingest", str(notes)]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged"] == 4
    assert main(["kb", "--kb", str(kb), "search", "--top-k", "2", "--json", "pivot partitioning sort"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["source"] == "test:quicksort" and {"source", "chunk_id", "score", "text"} <= set(hits[0])
    (tmp_path / "bad.jsonl").write_text("{broken\n")
    assert main(["kb", "--kb", str(kb), "ingest", str(notes), str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert main(["kb", "--kb", str(kb), "search", "  "]) == 2
    assert "empty" in capsys.readouterr().err
    assert KnowledgeBase(kb).stats()["chunks"] == 4  # the refused ingest wrote nothing
