"""CloudService deployment: Serve glue around ``tiers.cloud.CloudService`` (retrieval, grounded beam search).

Every replica opens the same knowledge base file (SQLite in WAL mode, see rag/store.py): ingestion
through any replica, or the CLI, is visible to all of them within ``kb.refresh_interval_s``, and
queries keep answering from the previous snapshot while a new one is built.

Requests arrive from the device tier (which emulates the device-edge and edge-cloud links and
accounts for their bytes) and from the ingress (knowledge base search and ingestion), as typed
models; a dict is validated into the model first, so a malformed one fails here with a clear error.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiflow_ray.config import AppArgs
from aiflow_ray.engines.base import Engine
from aiflow_ray.serve.common import EngineGate, LoadTracker, tier_engine
from aiflow_ray.tiers.cloud import BeamAnswer, CloudService, GroundedRequest, IngestRequest, Retrieval, RetrieveRequest


class CloudServer:
    def __init__(self, args: dict[str, Any], engine: Engine | None = None, embedder: Any = None, router: Any = None,
                 replica_id: Any = None) -> None:
        """``engine``, ``embedder``, ``router`` and ``replica_id`` are injected by unit tests."""
        self.args = AppArgs.model_validate(args)
        self.cloud = CloudService(tier_engine(self.args, "cloud", "verifier", engine), self.args.kb, embedder)
        self._ingest_lock = threading.Lock()  # one writer per replica; SQLite serialises across replicas
        self.load = LoadTracker("cloud", self.args, self.cloud.service_samples, router, replica_id)
        self.gate = EngineGate(self.cloud.engine, self.args.cloud.max_ongoing_requests, self.load, "cloud")

    async def retrieve(self, req: RetrieveRequest | dict[str, Any]) -> Retrieval:
        self.load.start()
        query = RetrieveRequest.model_validate(req)
        with self.load.admitted(), self.load.busy():  # retrieval does not wait for the engine
            return await asyncio.to_thread(self.cloud.retrieve, query)

    async def answer(self, req: GroundedRequest | dict[str, Any]) -> BeamAnswer:
        """A grounded answer: retrieval, the augmented prompt, beam search."""
        self.load.start()
        grounded = GroundedRequest.model_validate(req)
        with self.load.admitted():
            answer: BeamAnswer = await self.gate.run(self.cloud.answer, grounded)
            return answer

    def _ingest_locked(self, req: IngestRequest) -> dict[str, Any]:
        with self._ingest_lock:
            return self.cloud.ingest(req)

    async def ingest(self, req: IngestRequest | dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(self._ingest_locked, IngestRequest.model_validate(req))

    async def kb_stats(self) -> dict[str, Any]:
        return self.cloud.stats()

    async def check_health(self) -> None:
        self.load.start()
