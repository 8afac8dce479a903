"""The knowledge base: documents, chunks and their embeddings in one SQLite file, searched in memory.

Why SQLite: it is the best-kept embedded store there is (in CPython, no server, one file on disk),
and its write-ahead log lets any number of readers (cloud replicas, the CLI) query while one writer
ingests. It is the system of record; the vector index is derived from it. Each reader keeps an
in-memory snapshot (a matrix of vectors plus row ids) and rebuilds it in the background when the
knowledge base's version changes, swapping it in whole, so a query never waits for ingestion.

Ingestion is idempotent: a document is keyed by its source; re-ingesting the same text (with the
same chunking) changes nothing, changed text replaces that document's chunks.

Retrieval is hybrid. Dense search (cosine over all-MiniLM-L6-v2 embeddings of "title: chunk") finds
paraphrases; a lexical BM25 index (SQLite's FTS5, in the same file and transaction as the chunks)
finds the names and rare terms a small embedder blurs ("Guido van Rossum", "CSMA/CD"). The two
rankings are fused by reciprocal rank (Cormack et al. 2009: score = sum 1 / (60 + rank)), and the
result keeps the best chunk per source, so five hits are five documents. A query that arrives as an
embedding only (computed on the device) is searched densely. docs/benchmarks/retrieval.md has the
measured recall of each.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from aiflow_ray.logging_utils import get_logger
from aiflow_ray.rag.chunking import chunk_text
from aiflow_ray.rag.index import VectorIndex, build_index

log = get_logger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".jsonl")
MAX_FILE_BYTES = 256 << 20
MAX_QUERY_CHARS = 4096


class EmbedderLike(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray: ...


class IngestError(ValueError):
    """A file that cannot be ingested; the message names the file (and line)."""


class QueryError(ValueError):
    """A query that cannot be answered; the message names what is wrong."""


@dataclass(frozen=True)
class Document:
    source: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    source: str
    score: float
    text: str
    title: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IngestStats:
    documents: int = 0
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0


def read_documents(path: Path) -> Iterator[Document]:
    """Documents in a text, markdown or JSONL file, or in such files under a directory."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES)
        if not files:
            raise IngestError(f"{path}: no text, markdown or JSONL files in this directory")
        for file in files:
            yield from read_documents(file)
        return
    if not path.exists():
        raise IngestError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise IngestError(f"{path}: unsupported file type {suffix or '(none)'}; use text, markdown or JSONL")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise IngestError(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if suffix != ".jsonl":
        if not content.strip():
            raise IngestError(f"{path}: empty file")
        yield Document(source=f"file:{path.resolve()}", text=content, title=path.stem)
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IngestError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise IngestError(f"{path}:{number}: each line needs a non-empty string field 'text'")
        source = item.get("source", f"{path.name}:{number}")
        title = item.get("title", "")
        if not isinstance(source, str) or not source or not isinstance(title, str):
            raise IngestError(f"{path}:{number}: 'source' and 'title' must be strings")
        yield Document(source=source, text=item["text"], title=title)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    source TEXT PRIMARY KEY, title TEXT NOT NULL, content_hash TEXT NOT NULL,
    num_chunks INTEGER NOT NULL, ingested_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, chunk_id TEXT NOT NULL UNIQUE, source TEXT NOT NULL, ord INTEGER NOT NULL,
    text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_source ON chunks (source);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (text, title, tokenize = 'porter unicode61');
"""
RRF_K = 60
CANDIDATES = 50  # per ranking, before fusion
_TERM = re.compile(r"\w+", re.UNICODE)


def fts_query(text: str) -> str | None:
    """An FTS5 query matching any of the text's words (quoted, so no FTS syntax gets through)."""
    terms = list(dict.fromkeys(t.lower() for t in _TERM.findall(text)))[:64]
    return " OR ".join(f'"{t}"' for t in terms) or None


class KnowledgeBase:
    def __init__(self, path: Path, chunk_chars: int = 1000, overlap_chars: int = 200) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.chunk_chars = chunk_chars
        self.overlap_chars = overlap_chars
        self._local = threading.local()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('version', '0')")

    def _conn(self) -> sqlite3.Connection:
        # One connection per thread: sqlite3 connections must not be shared across threads.
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the ingesting writer
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    # -- reads ----------------------------------------------------------------------------------
    def version(self) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        return int(row[0]) if row else 0

    def embedder_name(self) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
        return str(row[0]) if row else None

    def stats(self) -> dict[str, Any]:
        conn = self._conn()
        return {
            "path": str(self.path), "version": self.version(), "embedder": self.embedder_name(),
            "documents": conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0],
            "chunks": conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0],
        }

    def load_vectors(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(version, row ids [n], vectors [n, d]) read in one transaction, so they agree."""
        conn = self._conn()
        with conn:
            conn.execute("BEGIN")
            version = self.version()
            rows = conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if not rows:
            return version, ids, np.zeros((0, 0), dtype=np.float32)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        return version, ids, vectors

    def lexical(self, query: str, limit: int) -> list[int]:
        """Row ids of the chunks best matching the query's words (BM25), best first."""
        match = fts_query(query)
        if match is None:
            return []
        rows = self._conn().execute(
            "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?", (match, limit)
        ).fetchall()
        return [r[0] for r in rows]

    def chunks_by_row(self, row_ids: Sequence[int]) -> dict[int, tuple[str, str, str, str]]:
        """row id -> (chunk_id, source, text, title)."""
        if not row_ids:
            return {}
        marks = ",".join("?" * len(row_ids))
        rows = self._conn().execute(
            f"SELECT c.id, c.chunk_id, c.source, c.text, COALESCE(d.title, '') FROM chunks c "
            f"LEFT JOIN documents d ON d.source = c.source WHERE c.id IN ({marks})", [int(r) for r in row_ids]
        ).fetchall()
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    # -- writes ---------------------------------------------------------------------------------
    def _hash(self, doc: Document) -> str:
        key = f"{self.chunk_chars}/{self.overlap_chars}/titled\0{doc.title}\0{doc.text}"
        return hashlib.sha256(key.encode()).hexdigest()

    def ingest(self, documents: Iterable[Document], embedder: EmbedderLike, progress: bool = False,
               batch_documents: int = 256) -> IngestStats:
        existing = self.embedder_name()
        if existing is not None and existing != embedder.name:
            raise IngestError(f"{self.path} holds {existing} embeddings; cannot add {embedder.name} ones")
        stats = IngestStats()
        batch: dict[str, Document] = {}
        from tqdm import tqdm

        bar = tqdm(desc="ingesting", unit="doc", disable=not progress)
        for doc in documents:
            batch[doc.source] = doc  # a source given twice: the later text wins
            if len(batch) >= batch_documents:
                self._ingest_batch(list(batch.values()), embedder, stats)
                bar.update(len(batch))
                batch = {}
        if batch:
            self._ingest_batch(list(batch.values()), embedder, stats)
            bar.update(len(batch))
        bar.close()
        return stats

    def _ingest_batch(self, docs: list[Document], embedder: EmbedderLike, stats: IngestStats) -> None:
        conn = self._conn()
        hashes = {d.source: self._hash(d) for d in docs}
        marks = ",".join("?" * len(docs))
        known = dict(conn.execute(f"SELECT source, content_hash FROM documents WHERE source IN ({marks})",
                                  [d.source for d in docs]).fetchall())
        todo = [d for d in docs if known.get(d.source) != hashes[d.source]]
        stats.documents += len(docs)
        stats.unchanged += len(docs) - len(todo)
        if not todo:
            return
        chunked = [(d, chunk_text(d.text, self.chunk_chars, self.overlap_chars)) for d in todo]
        # The title goes into what is embedded: a chunk from the middle of a long document often
        # never names its subject.
        texts = [f"{d.title}: {c}" if d.title else c for d, chunks in chunked for c in chunks]
        vectors = embedder.embed(texts) if texts else np.zeros((0, embedder.dim), np.float32)
        now = time.time()
        with conn:  # one transaction per batch: readers see all of it or none of it
            at = 0
            for doc, chunks in chunked:
                conn.execute("DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE source = ?)",
                             (doc.source,))
                removed = conn.execute("DELETE FROM chunks WHERE source = ?", (doc.source,)).rowcount
                stats.chunks_removed += removed
                if doc.source in known:
                    stats.replaced += 1
                else:
                    stats.added += 1
                for i, text in enumerate(chunks):
                    row = conn.execute(
                        "INSERT INTO chunks (chunk_id, source, ord, text, vector) VALUES (?, ?, ?, ?, ?)",
                        (f"{doc.source}#{i}", doc.source, i, text, vectors[at + i].astype(np.float32).tobytes()),
                    ).lastrowid
                    conn.execute("INSERT INTO chunks_fts (rowid, text, title) VALUES (?, ?, ?)", (row, text, doc.title))
                at += len(chunks)
                stats.chunks_added += len(chunks)
                conn.execute("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?)",
                             (doc.source, doc.title, hashes[doc.source], len(chunks), now))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (embedder.name,))
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'version'")


@dataclass
class _Snapshot:
    version: int
    row_ids: np.ndarray
    index: VectorIndex


class Retriever:
    """Search over a knowledge base's latest snapshot; rebuilds happen off the query path."""

    def __init__(self, kb: KnowledgeBase, embedder: EmbedderLike, index_kind: str = "exact",
                 refresh_interval_s: float = 1.0) -> None:
        self.kb = kb
        self.embedder = embedder
        self.index_kind = index_kind
        self.refresh_interval_s = refresh_interval_s
        self._snapshot = self._build()
        self._checked_at = time.monotonic()
        self._rebuilding = threading.Lock()

    def _build(self) -> _Snapshot:
        version, row_ids, vectors = self.kb.load_vectors()
        if len(row_ids) and vectors.shape[1] != self.embedder.dim:
            raise QueryError(f"knowledge base vectors have {vectors.shape[1]} dimensions, the embedder "
                             f"{self.embedder.dim}")
        index = build_index(self.index_kind, vectors if len(row_ids) else np.zeros((0, self.embedder.dim),
                                                                                     np.float32))
        log.info("knowledge base snapshot v%d: %d chunks (%s index)", version, len(row_ids), self.index_kind)
        return _Snapshot(version, row_ids, index)

    def _refresh_in_background(self) -> None:
        if not self._rebuilding.acquire(blocking=False):
            return  # a rebuild is already running

        def work() -> None:
            try:
                self._snapshot = self._build()  # a single reference swap: queries see old or new
            except Exception as exc:
                log.warning("knowledge base refresh failed: %s", exc)
            finally:
                self._rebuilding.release()

        threading.Thread(target=work, name="aiflow-kb-refresh", daemon=True).start()

    def maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.refresh_interval_s:
            return
        self._checked_at = now
        if self.kb.version() != self._snapshot.version:
            self._refresh_in_background()

    @property
    def num_chunks(self) -> int:
        return len(self._snapshot.row_ids)

    def embed_query(self, query: str) -> np.ndarray:
        if not query.strip():
            raise QueryError("query must not be empty")
        if len(query) > MAX_QUERY_CHARS:
            raise QueryError(f"query is longer than {MAX_QUERY_CHARS} characters")
        return self.embedder.embed([query])[0]

    def search(self, query: str | None = None, top_k: int = 5, query_vector: np.ndarray | None = None,
               mode: str = "hybrid") -> list[Hit]:
        """Best chunks for a query, one per source: hybrid (dense + BM25) when the text is given, dense
        when only an embedding is (``mode="dense"`` forces it, for comparison)."""
        if not 1 <= top_k <= 100:
            raise QueryError("top_k must be within 1..100")
        if mode not in ("hybrid", "dense"):
            raise QueryError("mode must be hybrid or dense")
        if query_vector is None:
            query_vector = self.embed_query(query or "")
        vector = np.asarray(query_vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.embedder.dim or not np.all(np.isfinite(vector)):
            raise QueryError(f"query embedding must be {self.embedder.dim} finite numbers")
        self.maybe_refresh()
        snap = self._snapshot
        if len(snap.row_ids) == 0:
            return []
        positions, _ = snap.index.search(vector[None, :], max(CANDIDATES, 4 * top_k))
        dense = [int(snap.row_ids[p]) for p in positions[0] if p >= 0]
        fused: dict[int, float] = {}
        for rank, row in enumerate(dense):
            fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank + 1)
        if mode == "hybrid" and query:
            for rank, row in enumerate(self.kb.lexical(query, max(CANDIDATES, 4 * top_k))):
                fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank + 1)
        ranked = sorted(fused, key=fused.__getitem__, reverse=True)
        rows = self.kb.chunks_by_row(ranked[: 8 * top_k + CANDIDATES])
        hits: list[Hit] = []
        seen: set[str] = set()
        for row in ranked:
            if row not in rows:  # replaced since the snapshot was built: skipped, not wrong
                continue
            chunk_id, source, text, title = rows[row]
            if source in seen:
                continue
            seen.add(source)
            hits.append(Hit(chunk_id, source, fused[row], text, title))
            if len(hits) == top_k:
                break
        return hits
