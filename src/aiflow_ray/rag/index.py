"""Vector indexes over unit-length embeddings (inner product = cosine similarity).

``VectorIndex`` is the seam: the knowledge base builds one from the vectors it stores and asks it
for the nearest rows. ``ExactIndex`` (a matrix product) is the default: at the demo corpora's size
(~12k chunks) it answers in a few milliseconds with recall 1 by construction
(docs/benchmarks/retrieval.md measures it against HNSW). ``HnswIndex`` (faiss) is for knowledge bases
large enough that a full scan costs more than its small recall loss. A served vector database would
implement the same two methods.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class VectorIndex(Protocol):
    name: str

    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row positions [q, k] (-1 where fewer than k rows exist) and scores [q, k], best first."""
        ...


class ExactIndex:
    name = "exact"

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        n = len(self.vectors)
        k = min(top_k, n)
        ids = np.full((len(q), top_k), -1, dtype=np.int64)
        scores = np.full((len(q), top_k), -np.inf, dtype=np.float32)
        if k == 0:
            return ids, scores
        sims = q @ self.vectors.T  # [q, n]
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        ids[:, :k] = np.take_along_axis(part, order, axis=1)
        scores[:, :k] = np.take_along_axis(part_scores, order, axis=1)
        return ids, scores


class HnswIndex:
    name = "hnsw"

    def __init__(self, vectors: np.ndarray, m: int = 32, ef_construction: int = 200, ef_search: int = 64) -> None:
        import faiss

        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexHNSWFlat(self.vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.hnsw.efSearch = ef_search
        if len(self.vectors):
            self.index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        scores, ids = self.index.search(q, top_k)
        return ids.astype(np.int64), scores.astype(np.float32)


def build_index(kind: str, vectors: np.ndarray) -> VectorIndex:
    if kind == "exact":
        return ExactIndex(vectors)
    if kind == "hnsw":
        return HnswIndex(vectors)
    raise ValueError(f"unknown index {kind!r}: exact or hnsw")
