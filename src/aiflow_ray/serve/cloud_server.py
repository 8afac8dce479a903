"""CloudService deployment: the knowledge base (retrieval) and grounded answers by beam search.

Every replica opens the same knowledge base file (SQLite in WAL mode, see rag/store.py): ingestion
through any replica, or the CLI, is visible to all of them within ``kb.refresh_interval_s``, and
queries keep answering from the previous snapshot while a new one is built.

Requests arrive from the device tier (which emulates the device-edge and edge-cloud links and
accounts for their bytes) and from the ingress (knowledge base search and ingestion).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections import deque
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from aiflow_ray.config import StrictModel
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.rag.prompting import grounded_messages
from aiflow_ray.rag.store import Document, KnowledgeBase, Retriever
from aiflow_ray.serve.args import AppArgs
from aiflow_ray.serve.common import LoadTracker, configure_torch_threads

log = get_logger(__name__)


class RetrieveRequest(StrictModel):
    query: str | None = Field(None, min_length=1, max_length=4096)
    query_vector_f16: str | None = Field(None, max_length=4096, description="base64 of 384 float16 values.")
    top_k: int = Field(4, ge=1, le=100)

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
    question: str = Field(..., min_length=1, max_length=100_000)
    beam_width: int = Field(4, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=-5.0, le=5.0)
    max_new_tokens: int = Field(64, ge=1, le=1024)


class IngestRequest(StrictModel):
    documents: list[dict[str, str]] = Field(..., min_length=1, max_length=1000)


class CloudServer:
    def __init__(self, args: dict[str, Any], engine: Any = None) -> None:
        self.args = AppArgs.model_validate(args)
        configure_torch_threads(self.args.cloud.torch_threads)
        if engine is None:
            from aiflow_ray.models.loader import load_engine

            pair = self.args.model_pair()
            engine = load_engine(pair.verifier, pair.dtype, pair.device)
        self.engine = engine
        self._lock = threading.Lock()
        # (tokens, seconds) of each beam search and (0, seconds) of each retrieval, for the router.
        self.service_samples: deque[tuple[int, float]] = deque(maxlen=256)
        self.load = LoadTracker("cloud", self.args, self.args.cloud.max_ongoing_requests, self.service_samples)
        from aiflow_ray.rag.embedder import Embedder

        kb_args = self.args.kb
        self.kb = KnowledgeBase(kb_args.path_or_default(), kb_args.chunk_chars, kb_args.overlap_chars)
        self.embedder = Embedder()
        self.retriever = Retriever(self.kb, self.embedder, kb_args.index, kb_args.refresh_interval_s)
        self._ingest_lock = threading.Lock()  # one writer per replica; SQLite serialises across replicas

    # -- retrieval ------------------------------------------------------------------------------
    def _retrieve(self, req: RetrieveRequest) -> dict[str, Any]:
        started = time.perf_counter()
        vector = req.vector()
        if vector is None:
            assert req.query is not None
            vector = self.retriever.embed_query(req.query)
        embedded = time.perf_counter()
        hits = self.retriever.search(req.query, top_k=req.top_k, query_vector=vector)  # hybrid when the text came
        self.service_samples.append((0, time.perf_counter() - started))
        return {"hits": [h.to_dict() for h in hits], "embed_s": embedded - started,
                "search_s": time.perf_counter() - embedded, "num_chunks": self.retriever.num_chunks}

    async def retrieve(self, request: dict[str, Any]) -> dict[str, Any]:
        self.load.start()
        req = RetrieveRequest.model_validate(request)
        with self.load.track():
            return await asyncio.to_thread(self._retrieve, req)

    # -- generation -----------------------------------------------------------------------------
    def _beam_ids(self, ids: list[int], beam_width: int, max_new_tokens: int, length_penalty: float) -> dict[str, Any]:
        from aiflow_ray.engines.hf import beam_search

        with self._lock:
            result = beam_search(self.engine, ids, beam_width, max_new_tokens, length_penalty)
        if result.token_ids:
            self.service_samples.append((len(result.token_ids), result.compute_s))
        return {"token_ids": result.token_ids, "text": self.engine.decode(result.token_ids),
                "sum_logprob": result.sum_logprob, "compute_s": result.compute_s}

    def _grounded(self, req: GroundedRequest) -> dict[str, Any]:
        retrieval = self._retrieve(req)
        messages, used = grounded_messages(req.question, retrieval["hits"])
        ids = self.engine.encode_prompt(messages, True)
        out = self._beam_ids(ids, req.beam_width, req.max_new_tokens, req.length_penalty)
        retrieval["hits"] = retrieval["hits"][:used]
        return {**out, "retrieval": retrieval, "prompt_tokens": len(ids)}

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """A grounded answer: retrieval, the augmented prompt, beam search."""
        self.load.start()
        req = GroundedRequest.model_validate(request)
        with self.load.track():
            return await asyncio.to_thread(self._grounded, req)

    # -- knowledge base -------------------------------------------------------------------------
    def _ingest(self, req: IngestRequest) -> dict[str, Any]:
        docs = []
        for number, raw in enumerate(req.documents):
            text, source = raw.get("text", ""), raw.get("source", "")
            if not text.strip() or not source.strip() or set(raw) - {"text", "source", "title"}:
                raise ValueError(f"documents[{number}] needs non-empty 'source' and 'text' (and at most 'title')")
            docs.append(Document(source=source, text=text, title=raw.get("title", "")))
        with self._ingest_lock:
            stats = self.kb.ingest(docs, self.embedder)
        log.info("ingested %d documents (%d chunks added)", stats.documents, stats.chunks_added)
        return {**stats.__dict__, **self.kb.stats()}

    async def ingest(self, request: dict[str, Any]) -> dict[str, Any]:
        req = IngestRequest.model_validate(request)
        return await asyncio.to_thread(self._ingest, req)

    async def kb_stats(self) -> dict[str, Any]:
        return {**self.kb.stats(), "snapshot_chunks": self.retriever.num_chunks, "index": self.retriever.index_kind,
                "embedder": self.embedder.name}

    async def check_health(self) -> None:
        self.load.start()
