"""EdgeVerifier deployment: the large model, per-session KV state, verification of drafts.

Requests of one session carry the session id as Serve's multiplexed model id, which the edge's
request router (serve/affinity.py) hashes to the replica holding that session. Affinity is only an
optimisation: a replica without the session answers NEED_CONTEXT and the device resends the
context. The replica keeps at most ``edge_sessions_per_replica`` sessions (LRU, see tiers/edge.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from aiflow_ray.config import AppArgs
from aiflow_ray.engines.base import Engine
from aiflow_ray.errors import CalibrationInterrupted
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.serve.common import (
    CpuShare,
    EngineGate,
    LoadTracker,
    retime_due,
    tier_engine,
)
from aiflow_ray.tiers.edge import EdgeVerifier, answer_ping

log = get_logger(__name__)

def _close(stream: Any) -> None:
    """End a stream early (its session is released, a native vLLM request aborted), unless a step of it is
    still running in another thread, which ends it when it finishes."""
    with contextlib.suppress(ValueError):
        stream.close()


class EdgeVerifierServer:
    def __init__(self, args: dict[str, Any], engine: Engine | None = None, router: Any = None,
                 replica_id: Any = None) -> None:
        """``engine``, ``router`` and ``replica_id`` are injected by unit tests; Serve passes only ``args``."""
        self.args = AppArgs.model_validate(args)
        self.edge = EdgeVerifier(tier_engine(self.args, "edge", "verifier", engine),
                                 max_sessions=self.args.edge_sessions_per_replica, image_limits=self.args.images,
                                 stream_interval_s=self.args.stream_interval_s)
        self.cpu = CpuShare()
        samples = self.edge.calibrate()
        self.contended_share = self.cpu.others_share()
        log.info("edge calibrated: %s (other processes kept %.0f%% of the node's CPUs busy meanwhile)",
                 ", ".join(f"{n} tokens {s * 1e3:.1f} ms" for n, s in samples), 100 * self.contended_share)
        self.load = LoadTracker("edge", self.args, self.edge.service_samples, router, replica_id,
                                self.edge.calibration_samples)
        self._recalibration: asyncio.Task[None] | None = None
        # One forward at a time for HF and llama.cpp; vLLM batches the verifies of different sessions.
        self.gate = EngineGate(self.edge.engine, self.args.edge.max_ongoing_requests, self.load, "edge")

    async def verify(self, payload: bytes) -> bytes:
        self.load.start()
        with self.load.admitted():
            reply: bytes = await self.gate.run(self.edge.handle, payload)
            return reply

    async def ping(self, payload: bytes) -> bytes:
        # Answered on the event loop, never behind the engine lock: a probe measures the link.
        return answer_ping(payload)

    async def release(self, payload: bytes) -> None:
        await self.gate.run(self.edge.handle, payload)

    async def vocab_fingerprint(self) -> str:
        """The verifier's token->id map digest: the device refuses to speculate against another tokenizer."""
        return self.edge.engine.vocab_fingerprint()

    async def vision(self) -> dict[str, str | None]:
        """How the verifier sees images (None: text only) and its vision encoder's digest: the device counts
        image tokens the same way, and sends encoder features only to an edge with the same encoder."""
        engine = self.edge.engine
        return {"spec": engine.vision.fingerprint() if engine.vision is not None else None,
                "encoder_digest": getattr(engine, "encoder_digest", None)}

    async def generate_stream(self, payload: bytes) -> AsyncIterator[bytes]:
        """Server-only path: tokens stream back as they are produced."""
        self.load.start()
        with self.load.admitted():
            stream = self.edge.generate_stream(payload)
            try:
                while (message := await self.gate.run(next, stream, None)) is not None:
                    yield message
            finally:
                await self.gate.run(_close, stream)

    async def stats(self) -> dict[str, Any]:
        import torch

        return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                "sessions": getattr(self.edge.engine, "num_sessions", None),
                "context_requests": self.edge.context_requests, "ongoing": self.load.ongoing,
                "queued": self.load.queued, "engine": type(self.edge.engine).__name__,
                "concurrent": self.gate.concurrent,
                # Scores and the decodes that ran them (llama.cpp's shared decodes): scores/decode > 1 when shared.
                "scores": getattr(self.edge.engine, "calls", None),
                "decodes": getattr(self.edge.engine, "decodes", None)}

    async def check_health(self) -> None:
        self.load.start()  # report load from the start, not only after the first request
        if self._recalibration_due():
            self._recalibration = asyncio.get_running_loop().create_task(self._recalibrate())

    def _recalibration_due(self) -> bool:
        """Not re-timing already, and re-timing due (``retime_due``; the others' share is the one since the last
        health check)."""
        if self._recalibration is not None and not self._recalibration.done():
            return False
        others_now = self.cpu.others_share()
        since_s = time.monotonic() - (self.edge.calibrated_at or 0.0)
        return retime_due(self.load.idle_s, since_s, self.contended_share, others_now)

    async def _recalibrate(self) -> None:
        try:
            self.cpu.others_share()
            # Gives way to the first request admitted meanwhile (it waits for one forward, not the whole timing).
            samples = await self.gate.run(functools.partial(self.edge.calibrate,
                                                            stop=lambda: self.load.admitted_count > 0))
            self.contended_share = self.cpu.others_share()
            log.info("edge re-timed while idle: %s (other processes: %.0f%% of the CPUs)",
                     ", ".join(f"{n} tokens {s * 1e3:.1f} ms" for n, s in samples), 100 * self.contended_share)
        except CalibrationInterrupted:
            log.info("edge re-timing gave way to a request")
        except Exception as exc:  # a calibration is an estimate's refresh: the replica serves on without it
            log.warning("edge re-calibration failed: %s", exc)
