"""CloudService deployment: the large model with beam search (retrieval joins it in the RAG tier)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pydantic import Field

from aiflow_ray.config import StrictModel
from aiflow_ray.serve.args import AppArgs
from aiflow_ray.serve.common import LoadTracker


class BeamRequest(StrictModel):
    prompt: str = Field(..., min_length=1)
    chat: bool = True
    beam_width: int = Field(4, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=-5.0, le=5.0)
    max_new_tokens: int = Field(64, ge=1, le=1024)


class CloudServer:
    def __init__(self, args: dict[str, Any], engine: Any = None) -> None:
        self.args = AppArgs.model_validate(args)
        if engine is None:
            from aiflow_ray.models.loader import load_engine

            pair = self.args.model_pair()
            engine = load_engine(pair.verifier, pair.dtype, pair.device)
        self.engine = engine
        self._lock = threading.Lock()
        self.load = LoadTracker("cloud", self.args, self.args.cloud.max_ongoing_requests)

    def _beam(self, req: BeamRequest) -> dict[str, Any]:
        from aiflow_ray.engines.hf import beam_search

        ids = self.engine.encode_prompt(req.prompt, req.chat)
        with self._lock:
            result = beam_search(self.engine, ids, req.beam_width, req.max_new_tokens, req.length_penalty)
        return {"token_ids": result.token_ids, "text": self.engine.decode(result.token_ids),
                "sum_logprob": result.sum_logprob, "compute_s": result.compute_s}

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        self.load.start()
        req = BeamRequest.model_validate(request)
        with self.load.track():
            return await asyncio.to_thread(self._beam, req)

    async def check_health(self) -> None:
        self.load.start()
