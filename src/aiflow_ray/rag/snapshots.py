"""The knowledge base on a shared volume: versioned, read-only snapshots that any number of pods read.

Cloud replicas on several Kubernetes pods cannot share one live SQLite file: its write-ahead log needs
shared memory between the processes, which a network file system does not give (and SQLite's locks are
unreliable there). So on a cluster each version of the knowledge base is a complete, immutable SQLite file:

    <root>/v000007/kb.sqlite        the whole knowledge base at version 7, never written after publication
    <root>/v000007/MANIFEST.json    version, parent, embedder, counts, size and sha256 of kb.sqlite
    <root>/.staging-<uuid>/         a version being published; never read

A writer (the ingestion RayJob, ``aiflow kb ingest --snapshots``, or a replica ingesting over the API)
copies the latest file to its local disk, ingests there (the ordinary idempotent ingestion, in WAL mode on
a local disk where WAL works), seals it, copies it to a staging directory with its manifest and publishes
it with ONE ``rename`` of that directory to ``v<N+1>``. A rename is atomic on local and network file
systems, so a reader sees the whole version or none of it, and it fails when ``v<N+1>`` already exists, so
two writers that started from the same version cannot both publish: the later one re-applies its documents
on the newer version and tries again (optimistic concurrency, no lock service needed).

Readers open a version with SQLite's ``immutable=1`` (no locks, no journal: fine on a read-only mount) and
follow the highest published version (rag/retriever.py swaps it in behind the queries). Old versions are
pruned only once they have been superseded for longer than any replica takes to move on, and a rollback
publishes an old version's file again as the newest, so versions only ever go up.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aiflow_ray.logging_utils import get_logger
from aiflow_ray.rag.store import Document, EmbedderLike, IngestError, IngestStats, KnowledgeBase, texts_to_embed

log = get_logger(__name__)

DB_NAME = "kb.sqlite"
MANIFEST_NAME = "MANIFEST.json"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
STALE_STAGING_S = 3600.0  # a staging directory this old belongs to a writer that died


class EmbeddingCache:
    """An embedder that answers texts it has seen (or was given, e.g. by a Ray Data job) from memory, so a
    publication retried on a newer version does not embed the same chunks again."""

    def __init__(self, name: str, dim: int, embedder: EmbedderLike | None = None) -> None:
        self.name = name
        self.dim = dim
        self._embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}

    @classmethod
    def around(cls, embedder: EmbedderLike) -> EmbeddingCache:
        return cls(embedder.name, embedder.dim, embedder)

    def add(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        if vectors.shape != (len(texts), self.dim):
            raise ValueError(f"{vectors.shape} vectors for {len(texts)} texts of dimension {self.dim}")
        self._vectors.update(zip(texts, vectors.astype(np.float32), strict=True))

    def embed(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            if self._embedder is None:
                from aiflow_ray.rag.embedder import Embedder

                self._embedder = Embedder()  # only when a newer version brought texts nobody embedded yet
            self.add(missing, self._embedder.embed(missing, batch_size, progress))
        return np.stack([self._vectors[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Lost(Exception):
    """Another writer published the version this one was about to."""


class SnapshotStore:
    def __init__(self, root: Path, chunk_chars: int = 1000, overlap_chars: int = 200) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.chunk_chars = chunk_chars
        self.overlap_chars = overlap_chars

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[int]:
        """Published versions, oldest first (a directory is published only once complete)."""
        found = []
        for entry in os.scandir(self.root):
            match = _VERSION_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_version(self) -> int:
        """The newest published version; 0 when nothing was ever published."""
        versions = self.versions()
        return versions[-1] if versions else 0

    def manifest(self, version: int) -> dict[str, Any]:
        manifest: dict[str, Any] = json.loads((self._dir(version) / MANIFEST_NAME).read_text())
        return manifest

    def open_version(self, version: int) -> KnowledgeBase:
        path = self._dir(version) / DB_NAME
        size = path.stat().st_size
        expected = self.manifest(version)["size_bytes"]
        if size != expected:  # a copy cut short by hand, or a volume that lost data
            raise IngestError(f"{path}: {size} bytes, its manifest says {expected}")
        return KnowledgeBase(path, self.chunk_chars, self.overlap_chars, snapshot_version=version)

    def open_latest(self) -> KnowledgeBase:
        version = self.latest_version()
        if version == 0:
            return self._empty()
        return self.open_version(version)

    def _empty(self) -> KnowledgeBase:
        """Version 0: an empty knowledge base, so that replicas start before the first ingestion."""
        path = self.root / ".empty" / DB_NAME
        if not path.exists():
            tmp = Path(tempfile.mkdtemp(prefix="aiflow-kb-")) / DB_NAME
            KnowledgeBase(tmp).seal()
            path.parent.mkdir(exist_ok=True)
            staged = path.with_name(f"{DB_NAME}.{uuid.uuid4().hex}")
            shutil.copyfile(tmp, staged)
            os.replace(staged, path)
            shutil.rmtree(tmp.parent, ignore_errors=True)
        return KnowledgeBase(path, self.chunk_chars, self.overlap_chars, snapshot_version=0)

    def stats(self) -> dict[str, Any]:
        version = self.latest_version()
        out: dict[str, Any] = {"path": str(self.root), "version": version, "versions": self.versions()}
        if version:
            manifest = self.manifest(version)
            out.update({k: manifest[k] for k in ("embedder", "documents", "chunks", "created_at")})
        else:
            out.update({"embedder": None, "documents": 0, "chunks": 0})
        return out

    # -- writes ---------------------------------------------------------------------------------
    def pending(self, documents: Sequence[Document]) -> list[Document]:
        """Documents that the next ingestion would embed, against the latest version."""
        return self.open_latest().pending(documents)

    def texts_to_embed(self, doc: Document) -> list[str]:
        return texts_to_embed(doc, self.chunk_chars, self.overlap_chars)

    def ingest(self, documents: Iterable[Document], embedder: EmbedderLike, progress: bool = False,
               attempts: int = 8) -> tuple[IngestStats, int]:
        """Ingest into a new version and publish it; (stats, the version that holds the documents). Nothing is
        published when nothing changed."""
        docs = list({d.source: d for d in documents}.values())  # a source given twice: the later text wins
        cache = embedder if isinstance(embedder, EmbeddingCache) else EmbeddingCache.around(embedder)
        for attempt in range(attempts):
            base = self.latest_version()
            with tempfile.TemporaryDirectory(prefix="aiflow-kb-") as tmp:
                work = Path(tmp) / DB_NAME
                if base:
                    shutil.copyfile(self._dir(base) / DB_NAME, work)
                kb = KnowledgeBase(work, self.chunk_chars, self.overlap_chars)
                stats = kb.ingest(docs, cache, progress=progress)
                if base and stats.added + stats.replaced == 0:
                    return stats, base
                counts = kb.stats()
                kb.seal()
                try:
                    version = self._publish(work, base, {k: counts[k] for k in ("embedder", "documents", "chunks")})
                except _Lost:
                    log.info("version %d was published by another writer; ingesting again on it (attempt %d)",
                             base + 1, attempt + 2)
                    continue
            return stats, version
        raise IngestError(f"{self.root}: other writers published {attempts} versions while this ingestion ran")

    def rollback(self, to_version: int) -> int:
        """Publish version ``to_version``'s file again as the newest version; replicas swap it in as usual."""
        if to_version not in self.versions():
            raise IngestError(f"{self.root}: no published version {to_version} (have {self.versions()})")
        manifest = self.manifest(to_version)
        for _ in range(8):
            base = self.latest_version()
            try:
                return self._publish(self._dir(to_version) / DB_NAME, base,
                                     {k: manifest[k] for k in ("embedder", "documents", "chunks")},
                                     restored_from=to_version)
            except _Lost:
                continue
        raise IngestError(f"{self.root}: other writers kept publishing; rollback not done")

    def _publish(self, db: Path, base: int, counts: dict[str, Any], restored_from: int | None = None) -> int:
        version = base + 1
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            shutil.copyfile(db, staging / DB_NAME)
            _fsync(staging / DB_NAME)
            manifest = {"version": version, "parent": base or None, "created_at": time.time(),
                        "size_bytes": (staging / DB_NAME).stat().st_size, "sha256": _sha256(staging / DB_NAME),
                        "chunk_chars": self.chunk_chars, "overlap_chars": self.overlap_chars, **counts}
            if restored_from is not None:
                manifest["restored_from"] = restored_from
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
            _fsync(staging / MANIFEST_NAME)
            try:
                os.rename(staging, self._dir(version))  # the publication: all or nothing, and only once
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise _Lost from None
                raise
            _fsync(self.root)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("published knowledge base v%d (%s documents, %s chunks)", version, counts.get("documents"),
                 counts.get("chunks"))
        return version

    def verify(self, version: int) -> None:
        """Raise unless the version's file has the size and sha256 its manifest records."""
        manifest = self.manifest(version)
        path = self._dir(version) / DB_NAME
        if _sha256(path) != manifest["sha256"]:
            raise IngestError(f"{path}: sha256 differs from its manifest")

    def prune(self, keep: int = 3, grace_s: float = 600.0, now: float | None = None) -> list[int]:
        """Delete versions older than the newest ``keep`` whose successor was published more than ``grace_s``
        ago (by then every replica, which checks each ``refresh_interval_s``, has moved on), and staging
        directories of writers that died. Returns the versions deleted."""
        now = time.time() if now is None else now
        versions = self.versions()
        deleted = []
        for older, newer in zip(versions[:-keep] if keep else versions, versions[1:], strict=False):
            if now - float(self.manifest(newer)["created_at"]) > grace_s:
                shutil.rmtree(self._dir(older), ignore_errors=True)
                deleted.append(older)
        for entry in self.root.glob(".staging-*"):
            if now - entry.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(entry, ignore_errors=True)
        if deleted:
            log.info("pruned knowledge base versions %s", deleted)
        return deleted
