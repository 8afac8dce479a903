"""The device tier's transports over Serve handles: to the edge (every payload passing the emulated device
link) and to the cloud, every call with a deadline (see aiflow_ray/calls.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aiflow_ray import calls
from aiflow_ray.network import wire
from aiflow_ray.network.link import DuplexLink
from aiflow_ray.tiers.cloud import BeamAnswer, GroundedRequest, Retrieval, RetrieveRequest


class ServeTransport:
    """Device <-> edge over Serve handles, every payload passing the emulated link.

    A session's calls carry its id as the request's multiplexed model id, which the edge's request
    router (serve/affinity.py) hashes to a replica: every round of a session reaches the replica that
    holds its KV cache. Every call has a deadline (``call_timeout_s``); a failed or late call raises
    ``TierUnavailable`` and the device retries it with the context resent.
    """

    def __init__(self, edge_handle: Any, link: DuplexLink, call_timeout_s: float = 30.0) -> None:
        self.edge = edge_handle
        self.link = link
        self.clock = link.clock
        self.call_timeout_s = call_timeout_s

    def _for(self, payload: bytes) -> Any:
        return self.edge.options(multiplexed_model_id=(wire.peek_session_id(payload) or b"").hex())

    def exchange(self, payload: bytes, link_timeout_s: float | None = None) -> bytes:
        # A link without a stated timeout (exact requests) may stall no longer than the call itself may take.
        link_timeout_s = link_timeout_s or self.call_timeout_s
        self.link.up.transfer(len(payload), timeout_s=link_timeout_s)
        reply: bytes = calls.call("edge", self._for(payload).verify.remote(payload), self.call_timeout_s)
        self.link.down.transfer(len(reply), timeout_s=link_timeout_s)
        return reply

    def notify(self, payload: bytes) -> None:
        self.link.up.schedule(len(payload))
        self._for(payload).release.remote(payload)

    def stream(self, payload: bytes, session_bound: bool = False) -> Iterator[tuple[bytes, float]]:
        self.link.up.transfer(len(payload), timeout_s=self.call_timeout_s)
        # A new server-only stream has no session to find again and goes to the least loaded replica; one that
        # continues a speculative session goes where its rounds went.
        handle = self._for(payload) if session_bound else self.edge
        responses = handle.options(stream=True).generate_stream.remote(payload)
        for message in calls.iterate("edge", responses, self.call_timeout_s):
            # Waits for the message on the link, re-timed if conditions change, bounded like the call.
            self.link.down.transfer(len(message), timeout_s=self.call_timeout_s)
            yield message, self.clock.now()


class ServeCloud:
    """The cloud tier over its Serve handle (``tiers.grounded.CloudTransport``), for one request: each call
    has a deadline and is retried on another replica (both calls are read-only) until the request's own."""

    def __init__(self, handle: Any, call_timeout_s: float = 120.0, deadline: float | None = None,
                 max_attempts: int = 3) -> None:
        self.handle = handle
        self.call_timeout_s = call_timeout_s
        self.deadline = deadline if deadline is not None else time.monotonic() + call_timeout_s
        self.max_attempts = max_attempts

    def _call(self, method: str, req: Any) -> Any:
        def attempt() -> Any:
            timeout_s = max(min(self.call_timeout_s, self.deadline - time.monotonic()), 0.1)
            return calls.call("cloud", getattr(self.handle, method).remote(req), timeout_s)

        return calls.with_failover("cloud", attempt, self.deadline, max_attempts=self.max_attempts)

    def retrieve(self, req: RetrieveRequest) -> Retrieval:
        out: Retrieval = self._call("retrieve", req)
        return out

    def answer(self, req: GroundedRequest) -> BeamAnswer:
        out: BeamAnswer = self._call("answer", req)
        return out
