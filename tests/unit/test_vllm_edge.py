"""The edge replica on vLLM: verifications of different sessions share engine steps; no lock between them.

The served edge (``EdgeVerifierServer``) with the tiny verifier on vLLM's CPU build, called as Serve
calls it (its async methods, many at once). vLLM records, per request, when its scheduler admitted it
into a step; requests admitted at the same instant ran in the same engine step.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aiflow_ray.config import AppArgs, LinkConfig, SamplingConfig
from aiflow_ray.engines.base import Engine
from aiflow_ray.network import wire
from aiflow_ray.network.messages import GenerateRequest, Header, MsgType, VerifyRequest, VerifyStatus
from aiflow_ray.serve.edge_server import EdgeVerifierServer
from tests.conftest import PROMPTS
from tests.unit.fakes import FakeHandle
from tests.unit.test_servers import RecordingRouter

pytestmark = pytest.mark.vllm
SESSIONS = 4


@pytest.fixture()
def edge(vllm_pair: tuple[Engine, Engine], tmp_path: Path) -> EdgeVerifierServer:
    args = AppArgs(link_probe={"enabled": False}, link=LinkConfig(bandwidth_bps=1e9, rtt_s=0.0),
                   edge={"label_selector": {"tier": "edge"}, "engine": "vllm", "max_ongoing_requests": 8},
                   kb={"path": str(tmp_path / "kb.sqlite")}).model_dump(mode="json")
    return EdgeVerifierServer(args, engine=vllm_pair[1], router=FakeHandle(RecordingRouter()),
                              replica_id=lambda: "edge-vllm")


def _verify(sid: bytes, seq: int, base_len: int, draft: list[int], context: list[int] | None = None) -> bytes:
    return wire.encode_verify(VerifyRequest(
        Header(MsgType.VERIFY, sid, seq), base_len, np.asarray(draft, np.int32),
        np.asarray(context, np.int32) if context is not None else None))


def _greedy_path(engine: Engine, ids: list[int], n: int) -> list[int]:
    engine.open_session("path", ids)
    try:
        out: list[int] = []
        for _ in range(n):
            token = engine.score("path", [], SamplingConfig()).greedy_ids
            assert token is not None
            out.append(token[0])
            engine.append("path", token[:1])
        return out
    finally:
        engine.release("path")


def test_verifies_of_different_sessions_share_engine_steps(edge: EdgeVerifierServer,
                                                           vllm_pair: tuple[Engine, Engine]) -> None:
    engine: Any = vllm_pair[1]
    assert edge.gate.concurrent, "the vLLM edge must not take the one-forward-at-a-time lock"
    prompts = [engine.encode_prompt(p, chat=True) for p in PROMPTS[:SESSIONS]]
    paths = [_greedy_path(engine, ids, 9) for ids in prompts]
    sids = [wire.new_session_id() for _ in prompts]

    async def run() -> list[list[int]]:
        # Round 0 opens every session; then three rounds of k=2 drafts, each round's verifies all at once.
        # Drafts are the target's own path with the second token wrong: 1 accepted + the correction.
        emitted: list[list[int]] = [[] for _ in prompts]
        for seq in range(4):
            payloads = []
            for i, ids in enumerate(prompts):
                done = emitted[i]
                draft = [paths[i][len(done)], paths[i][len(done) + 1] ^ 1]
                context = ids if seq == 0 else None
                payloads.append(_verify(sids[i], seq, len(ids) + len(done), draft, context))
            replies = await asyncio.gather(*(edge.verify(p) for p in payloads))
            for i, reply in enumerate(replies):
                result = wire.decode(reply)
                assert result.status == VerifyStatus.OK, result
                emitted[i] += [*[paths[i][len(emitted[i])]][: result.num_accepted], result.next_token]
        return emitted

    before = len(engine.scheduled)
    emitted = asyncio.run(run())
    # Exactness under batching: every session's tokens are its target path.
    for i, tokens in enumerate(emitted):
        assert tokens == paths[i][: len(tokens)], f"session {i}"
    steps = Counter(ts for _, ts in list(engine.scheduled)[before:])
    assert max(steps.values()) >= 2, f"no two verifies shared an engine step: {sorted(steps.values())}"


def test_server_only_streams_decode_natively_and_together(edge: EdgeVerifierServer,
                                                          vllm_pair: tuple[Engine, Engine]) -> None:
    engine: Any = vllm_pair[1]
    prompts = [engine.encode_prompt(p, chat=True) for p in PROMPTS[4:6]]
    want = [_greedy_path(engine, ids, 8) for ids in prompts]
    held = engine.num_sessions

    async def stream(ids: list[int]) -> list[int]:
        payload = wire.encode_generate(GenerateRequest(Header(MsgType.GENERATE, wire.new_session_id(), 0),
                                                       np.asarray(ids, np.int32), 8, None))
        tokens: list[int] = []
        async for message in edge.generate_stream(payload):
            tokens += wire.decode(message).token_ids.tolist()
        return tokens

    async def both() -> list[list[int]]:
        return list(await asyncio.gather(*(stream(ids) for ids in prompts)))

    assert asyncio.run(both()) == want
    assert engine.num_sessions == held, "a server-only stream left its session behind"


def test_a_speculative_session_continues_as_a_native_stream(edge: EdgeVerifierServer,
                                                            vllm_pair: tuple[Engine, Engine]) -> None:
    """A request that switches path mid-way (tiers/device.py, PathSwitch): after a verify round, a GENERATE
    naming the session streams the rest from vLLM's own decode, and the whole output is the target's path."""
    engine: Any = vllm_pair[1]
    ids = engine.encode_prompt(PROMPTS[6], chat=True)
    want = _greedy_path(engine, ids, 10)
    sid = wire.new_session_id()

    async def run() -> list[int]:
        reply = wire.decode(await edge.verify(_verify(sid, 0, len(ids), [want[0], want[1] ^ 1], ids)))
        assert reply.status == VerifyStatus.OK and reply.num_accepted == 1
        emitted = [want[0], reply.next_token]
        payload = wire.encode_generate(GenerateRequest(Header(MsgType.GENERATE, sid, 1), np.zeros(0, np.int32),
                                                       8, None, continue_from=len(ids) + 2))
        async for message in edge.generate_stream(payload):
            emitted += wire.decode(message).token_ids.tolist()
        return emitted

    held = engine.num_sessions
    assert asyncio.run(run()) == want
    assert engine.num_sessions == held


def test_beam_search_on_vllm(vllm_pair: tuple[Engine, Engine]) -> None:
    """The cloud's beam search on vLLM (each step's beams one batch): width 1 is the greedy path, and wider
    beams score at least as well by the objective (sum log-probability with length_penalty 0)."""
    from aiflow_ray.engines.beam import beam_search

    engine: Any = vllm_pair[1]
    ids = engine.encode_prompt(PROMPTS[8], chat=True)
    one = beam_search(engine, ids, beam_width=1, max_new_tokens=10)
    assert one.token_ids == _greedy_path(engine, ids, 10)[: len(one.token_ids)]
    wide = beam_search(engine, ids, beam_width=3, max_new_tokens=10, length_penalty=0.0)
    assert wide.sum_logprob >= one.sum_logprob - 1e-3
