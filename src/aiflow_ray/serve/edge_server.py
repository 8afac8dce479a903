"""EdgeVerifier deployment: the large model, per-session KV state, verification of drafts.

Requests of one session carry the session id as Serve's multiplexed model id, which the edge's
request router (serve/affinity.py) hashes to the replica holding that session. Affinity is only an
optimisation: a replica without the session answers NEED_CONTEXT and the device resends the
context. The replica keeps at most ``edge_sessions_per_replica`` sessions (LRU, see tiers/edge.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from aiflow_ray.config import AppArgs
from aiflow_ray.engines.base import Engine
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.serve.common import LoadTracker, tier_engine
from aiflow_ray.tiers.edge import EdgeVerifier, answer_ping

log = get_logger(__name__)

class EdgeVerifierServer:
    def __init__(self, args: dict[str, Any], engine: Engine | None = None, router: Any = None,
                 replica_id: Any = None) -> None:
        """``engine``, ``router`` and ``replica_id`` are injected by unit tests; Serve passes only ``args``."""
        self.args = AppArgs.model_validate(args)
        self.edge = EdgeVerifier(tier_engine(self.args, "edge", "verifier", engine),
                                 max_sessions=self.args.edge_sessions_per_replica)
        self._engine_lock = threading.Lock()  # one forward at a time: the engine is not thread-safe
        samples = self.edge.calibrate()
        log.info("edge calibrated: %s", ", ".join(f"{n} tokens {s * 1e3:.1f} ms" for n, s in samples))
        self.load = LoadTracker("edge", self.args, self.edge.service_samples, router, replica_id)

    def _verify_locked(self, payload: bytes) -> bytes:
        with self._engine_lock, self.load.busy():
            return self.edge.handle(payload)

    async def verify(self, payload: bytes) -> bytes:
        self.load.start()
        with self.load.admitted():
            return await asyncio.to_thread(self._verify_locked, payload)

    async def ping(self, payload: bytes) -> bytes:
        # Answered on the event loop, never behind the engine lock: a probe measures the link.
        return answer_ping(payload)

    async def release(self, payload: bytes) -> None:
        await asyncio.to_thread(self._verify_locked, payload)

    async def vocab_fingerprint(self) -> str:
        """The verifier's token->id map digest: the device refuses to speculate against another tokenizer."""
        return self.edge.engine.vocab_fingerprint()

    async def generate_stream(self, payload: bytes) -> AsyncIterator[bytes]:
        """Server-only path: tokens stream back as they are produced."""
        self.load.start()
        with self.load.admitted():
            stream = self.edge.generate_stream(payload)

            def step() -> bytes | None:
                with self._engine_lock, self.load.busy():
                    return next(stream, None)

            while (message := await asyncio.to_thread(step)) is not None:
                yield message

    async def stats(self) -> dict[str, Any]:
        import torch

        return {"torch_threads": torch.get_num_threads(), "sessions": getattr(self.edge.engine, "num_sessions", None),
                "context_requests": self.edge.context_requests, "ongoing": self.load.ongoing,
                "queued": self.load.queued}

    async def check_health(self) -> None:
        self.load.start()  # report load from the start, not only after the first request
