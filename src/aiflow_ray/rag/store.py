"""The knowledge base: documents, chunks and their embeddings in one SQLite file, searched in memory.

Why SQLite: it is the best-kept embedded store there is (in CPython, no server, one file on disk),
and its write-ahead log lets any number of readers (cloud replicas, the CLI) query while one writer
ingests. It is the system of record; the vector index is derived from it. Each reader keeps an
in-memory snapshot (a matrix of vectors plus row ids) and rebuilds it in the background when the
knowledge base's version changes, swapping it in whole, so a query never waits for ingestion.

On several machines (cloud replicas on Kubernetes pods) the knowledge base is a series of versioned,
read-only snapshots of such a file on a shared volume instead (rag/snapshots.py): WAL needs shared
memory that network file systems do not give, while an immutable file needs no locks at all.

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


def texts_to_embed(doc: Document, chunk_chars: int, overlap_chars: int) -> list[str]:
    """What is embedded for a document's chunks. The title goes in: a chunk from the middle of a long
    document often never names its subject."""
    return [f"{doc.title}: {c}" if doc.title else c for c in chunk_text(doc.text, chunk_chars, overlap_chars)]


class KnowledgeBase:
    def __init__(self, path: Path, chunk_chars: int = 1000, overlap_chars: int = 200,
                 snapshot_version: int | None = None) -> None:
        """``snapshot_version``: the file is a published snapshot of that version, opened read-only and
        immutable (no locks, no journal: safe on read-only and network volumes); see rag/snapshots.py."""
        self.path = Path(path)
        self.chunk_chars = chunk_chars
        self.overlap_chars = overlap_chars
        self.snapshot_version = snapshot_version
        self._local = threading.local()
        self._shared: sqlite3.Connection | None = None
        if snapshot_version is not None:
            # One connection for all threads, opened now: it holds the file open, so a version pruned while
            # this reader still serves it stays readable (an unlinked file lives while it is open), and a
            # read-only immutable database needs no per-thread state (SQLite is built serialized here).
            self._shared = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro&immutable=1", uri=True,
                                           check_same_thread=False)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as conn:
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('version', '0')")

    def _conn(self) -> sqlite3.Connection:
        if self._shared is not None:
            return self._shared
        # One connection per thread: a writable connection must not be shared across threads.
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60)
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the ingesting writer
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def seal(self) -> None:
        """Fold the write-ahead log into the file and leave WAL mode, so the file alone is the whole knowledge
        base (a snapshot to publish), then close this thread's connection."""
        conn = self._conn()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.close()
        self._local.conn = None

    # -- the source a Retriever follows (rag/retriever.py) ------------------------------------------
    def latest_version(self) -> int:
        return self.version()

    def open_latest(self) -> KnowledgeBase:
        return self  # one live file: the reader is the writer's file, read in WAL mode

    # -- reads ----------------------------------------------------------------------------------
    def version(self) -> int:
        if self.snapshot_version is not None:
            return self.snapshot_version
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
        if self._shared is not None:  # immutable: nothing can change between the two reads
            version = self.version()
            rows = conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        else:
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
        if self.snapshot_version is not None:
            raise IngestError(f"{self.path} is published snapshot v{self.snapshot_version}: read-only")
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

    def _known_hashes(self, docs: Sequence[Document]) -> dict[str, str]:
        marks = ",".join("?" * len(docs))
        return dict(self._conn().execute(f"SELECT source, content_hash FROM documents WHERE source IN ({marks})",
                                         [d.source for d in docs]).fetchall())

    def pending(self, docs: Sequence[Document]) -> list[Document]:
        """The documents an ingestion would (re-)embed: new sources and changed texts."""
        out: list[Document] = []
        for start in range(0, len(docs), 500):  # SQLite caps the parameters of one statement
            part = docs[start : start + 500]
            known = self._known_hashes(part)
            out += [d for d in part if known.get(d.source) != self._hash(d)]
        return out

    def texts_to_embed(self, doc: Document) -> list[str]:
        return texts_to_embed(doc, self.chunk_chars, self.overlap_chars)

    def _ingest_batch(self, docs: list[Document], embedder: EmbedderLike, stats: IngestStats) -> None:
        conn = self._conn()
        hashes = {d.source: self._hash(d) for d in docs}
        known = self._known_hashes(docs)
        todo = [d for d in docs if known.get(d.source) != hashes[d.source]]
        stats.documents += len(docs)
        stats.unchanged += len(docs) - len(todo)
        if not todo:
            return
        chunked = [(d, chunk_text(d.text, self.chunk_chars, self.overlap_chars)) for d in todo]
        texts = [t for d, _ in chunked for t in self.texts_to_embed(d)]
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
