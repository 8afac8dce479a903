"""Search over the latest version of a knowledge base, rebuilt and swapped in off the query path.

A retriever follows a *source*: one live SQLite file (``KnowledgeBase``, on one machine) or a directory of
published snapshots (``SnapshotStore``, on a shared volume). Each version it serves is a ``_Snapshot``: the
vector index of that version together with the reader it came from, so the lexical half of a hybrid query,
the chunk texts and the vectors all answer from the same version. A new version is built in a background
thread and swapped in by one reference assignment: a query in flight finishes on the version it started
on, and no query ever waits for a build.

A watcher thread checks the source every ``refresh_interval_s`` whether or not queries come: checking only
behind queries let a replica idle since before an ingestion answer its next query from the old version (a
grounded answer without the documents just added). So a version is served by every replica within
``refresh_interval_s`` plus its build time.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from aiflow_ray.logging_utils import get_logger
from aiflow_ray.rag.index import VectorIndex, build_index
from aiflow_ray.rag.store import CANDIDATES, MAX_QUERY_CHARS, RRF_K, EmbedderLike, Hit, KnowledgeBase, QueryError

log = get_logger(__name__)


class KbSource(Protocol):
    def latest_version(self) -> int: ...

    def open_latest(self) -> KnowledgeBase: ...


@dataclass
class _Snapshot:
    version: int
    row_ids: np.ndarray
    index: VectorIndex
    kb: KnowledgeBase  # the reader of this version


class Retriever:
    """Search over a knowledge base's latest snapshot; rebuilds happen off the query path."""

    def __init__(self, kb: KbSource, embedder: EmbedderLike, index_kind: str = "exact",
                 refresh_interval_s: float = 1.0) -> None:
        self.source = kb
        self.embedder = embedder
        self.index_kind = index_kind
        self.refresh_interval_s = refresh_interval_s
        self._snapshot = self._build()
        self._checked_at = time.monotonic()
        self._rebuilding = threading.Lock()
        self._closed = threading.Event()
        # The watcher holds the retriever weakly: a retriever nobody uses any more is collected, and its
        # watcher ends at its next wake-up.
        threading.Thread(target=_watch, args=(weakref.ref(self), self._closed, refresh_interval_s),
                         name="aiflow-kb-watch", daemon=True).start()

    def close(self) -> None:
        """Stop watching the source (the current snapshot keeps answering)."""
        self._closed.set()

    def _build(self) -> _Snapshot:
        reader = self.source.open_latest()
        version, row_ids, vectors = reader.load_vectors()
        if len(row_ids) and vectors.shape[1] != self.embedder.dim:
            raise QueryError(f"knowledge base vectors have {vectors.shape[1]} dimensions, the embedder "
                             f"{self.embedder.dim}")
        index = build_index(self.index_kind, vectors if len(row_ids) else np.zeros((0, self.embedder.dim),
                                                                                     np.float32))
        log.info("knowledge base snapshot v%d: %d chunks (%s index)", version, len(row_ids), self.index_kind)
        return _Snapshot(version, row_ids, index, reader)

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
        """Start a rebuild in the background when the source has a new version (checked at most once per
        ``refresh_interval_s``)."""
        now = time.monotonic()
        if now - self._checked_at < self.refresh_interval_s:
            return
        self._checked_at = now
        if self.source.latest_version() != self._snapshot.version:
            self._refresh_in_background()

    def refresh_now(self) -> int:
        """Build and swap in the latest version before returning it (after this replica's own ingestion, so
        that its next query reads what it wrote)."""
        with self._rebuilding:
            if self.source.latest_version() != self._snapshot.version:
                self._snapshot = self._build()
        return self._snapshot.version

    @property
    def version(self) -> int:
        return self._snapshot.version

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
            for rank, row in enumerate(snap.kb.lexical(query, max(CANDIDATES, 4 * top_k))):
                fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank + 1)
        ranked = sorted(fused, key=fused.__getitem__, reverse=True)
        rows = snap.kb.chunks_by_row(ranked[: 8 * top_k + CANDIDATES])
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


def _watch(ref: weakref.ReferenceType[Retriever], closed: threading.Event, interval_s: float) -> None:
    while not closed.wait(interval_s):
        retriever = ref()
        if retriever is None:
            return
        try:
            retriever.maybe_refresh()
        except Exception as exc:  # a source briefly unreadable (a volume remounting): the next check retries
            log.warning("knowledge base check failed: %s", exc)
        del retriever  # no strong reference while asleep
