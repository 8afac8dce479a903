"""The cloud tier's logic, free of Ray: retrieval over the knowledge base and grounded beam search.

Requests and answers are pydantic models, so what crosses a Ray hop (device -> cloud, ingress ->
cloud) is typed and validated at the receiving end; nothing is unpickled from clients. The Serve
deployment (serve/cloud_server.py) adds locks, load reports and threads around this class; the
in-process pipeline uses it as it is.
"""

from __future__ import annotations

import base64
import time
from collections import deque
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from aiflow_ray.config import KbArgs, StrictModel
from aiflow_ray.engines.base import Engine
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.rag.prompting import grounded_messages
from aiflow_ray.rag.retriever import Retriever
from aiflow_ray.rag.snapshots import SnapshotStore
from aiflow_ray.rag.store import Document, KnowledgeBase

log = get_logger(__name__)


class RetrieveRequest(StrictModel):
    query: str | None = Field(None, min_length=1, max_length=4096, description="Query text (hybrid search).")
    query_vector_f16: str | None = Field(None, max_length=4096, description="base64 of 384 float16 values.")
    top_k: int = Field(4, ge=1, le=100, description="Hits to return, one per source.")

    @model_validator(mode="after")
    def _one(self) -> RetrieveRequest:
        if (self.query is None) == (self.query_vector_f16 is None):
            raise ValueError("give exactly one of query and query_vector_f16")
        return self

    def vector(self) -> np.ndarray | None:
        if self.query_vector_f16 is None:
            return None
        return np.frombuffer(base64.b64decode(self.query_vector_f16, validate=True), dtype="<f2").astype(np.float32)


class GroundedRequest(RetrieveRequest):
    question: str = Field(..., min_length=1, max_length=100_000, description="What the answer must address.")
    beam_width: int = Field(4, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=-5.0, le=5.0)
    max_new_tokens: int = Field(64, ge=1, le=4096)


class RetrievedChunk(StrictModel):
    chunk_id: str
    source: str
    score: float
    text: str
    title: str = ""


class Retrieval(StrictModel):
    hits: tuple[RetrievedChunk, ...]
    num_chunks: int
    embed_s: float
    search_s: float

    def used(self, count: int) -> Retrieval:
        return self.model_copy(update={"hits": self.hits[:count]})

    def hit_dicts(self) -> list[dict[str, Any]]:
        return [h.model_dump() for h in self.hits]


class BeamAnswer(StrictModel):
    token_ids: tuple[int, ...]
    text: str
    sum_logprob: float
    compute_s: float
    prompt_tokens: int
    retrieval: Retrieval


class IngestDocument(StrictModel):
    source: str = Field(..., min_length=1, max_length=512, pattern=r"\S", description="Stable id; re-ingesting "
                        "it replaces it.")
    text: str = Field(..., min_length=1, max_length=1_000_000, pattern=r"\S")
    title: str = Field("", max_length=512)


class IngestRequest(StrictModel):
    documents: tuple[IngestDocument, ...] = Field(..., min_length=1, max_length=1000)


class CloudService:
    """Retrieval and grounded beam search over one knowledge base, with one large model.

    Not thread-safe for generation: the caller serialises ``answer`` (one engine); retrieval and
    ingestion may run beside it (SQLite and the retriever's snapshot handle their own concurrency).
    """

    def __init__(self, engine: Engine, kb_args: KbArgs, embedder: Any = None) -> None:
        from aiflow_ray.rag.embedder import Embedder

        self.engine = engine
        self.kb_args = kb_args
        snapshots = kb_args.snapshots_or_default()
        self.kb: KnowledgeBase | SnapshotStore = (
            SnapshotStore(snapshots, kb_args.chunk_chars, kb_args.overlap_chars) if snapshots
            else KnowledgeBase(kb_args.path_or_default(), kb_args.chunk_chars, kb_args.overlap_chars))
        self.embedder = embedder or Embedder()
        self.retriever = Retriever(self.kb, self.embedder, kb_args.index, kb_args.refresh_interval_s)
        # (tokens, seconds) of each beam search and (0, seconds) of each retrieval, for the router.
        self.service_samples: deque[tuple[int, float]] = deque(maxlen=256)

    def retrieve(self, req: RetrieveRequest) -> Retrieval:
        started = time.perf_counter()
        vector = req.vector()
        if vector is None:
            assert req.query is not None
            vector = self.retriever.embed_query(req.query)
        embedded = time.perf_counter()
        hits = self.retriever.search(req.query, top_k=req.top_k, query_vector=vector)  # hybrid when the text came
        self.service_samples.append((0, time.perf_counter() - started))
        return Retrieval(hits=tuple(RetrievedChunk(**h.to_dict()) for h in hits), num_chunks=self.retriever.num_chunks,
                         embed_s=embedded - started, search_s=time.perf_counter() - embedded)

    def answer(self, req: GroundedRequest) -> BeamAnswer:
        """Retrieval, the augmented prompt, beam search on the tier's engine (never below greedy: see
        engines/beam.py)."""
        from aiflow_ray.engines.beam import beam_search

        retrieval = self.retrieve(req)
        messages, used = grounded_messages(req.question, retrieval.hit_dicts())
        ids = self.engine.encode_prompt(messages, True)
        result = beam_search(self.engine, ids, req.beam_width, req.max_new_tokens, req.length_penalty)
        if result.token_ids:
            self.service_samples.append((len(result.token_ids), result.compute_s))
        return BeamAnswer(token_ids=tuple(result.token_ids), text=self.engine.decode(result.token_ids),
                          sum_logprob=result.sum_logprob, compute_s=result.compute_s, prompt_tokens=len(ids),
                          retrieval=retrieval.used(used))

    def ingest(self, req: IngestRequest) -> dict[str, Any]:
        docs = [Document(source=d.source, text=d.text, title=d.title) for d in req.documents]
        if isinstance(self.kb, SnapshotStore):
            stats, _ = self.kb.ingest(docs, self.embedder)  # a new version for every replica
            self.kb.prune(self.kb_args.snapshots_keep, self.kb_args.snapshots_grace_s)  # versions stay bounded
        else:
            stats = self.kb.ingest(docs, self.embedder)
        self.retriever.refresh_now()  # this replica's next query reads what it just wrote
        log.info("ingested %d documents (%d chunks added)", stats.documents, stats.chunks_added)
        return {**stats.__dict__, **self.kb.stats()}

    def stats(self) -> dict[str, Any]:
        return {**self.kb.stats(), "snapshot_chunks": self.retriever.num_chunks, "index": self.retriever.index_kind,
                "embedder": self.embedder.name, "serving_version": self.retriever.version,
                "store": "snapshots" if isinstance(self.kb, SnapshotStore) else "sqlite"}
