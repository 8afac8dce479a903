"""Session affinity for the edge verifiers: every round of a session reaches the replica holding its KV cache.

Serve's multiplexing learns which replica holds a model id from the replicas' periodic reports, so
the rounds right after a session starts (tens of milliseconds apart) often went to another replica,
which answered NEED_CONTEXT: with two edge replicas, 29-33 of 76 rounds resent their whole context.
This router needs no reports: it ranks replicas by rendezvous hashing of the session id (carried as
the request's multiplexed model id), which every device replica computes alike from the replica
set it already knows. When replicas come or go, only the sessions of the changed replicas move
(they resend their context once); when the preferred replica is full, the request goes to the
least loaded other one (one resend) rather than wait. Requests without a session id (server-only
streams, probes) go to the least loaded replica.
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rendezvous_rank(session_id: str, replica_ids: list[str]) -> list[str]:
    """Replica ids, most preferred first, for ``session_id`` (highest random weight hashing)."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{session_id}/{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class SessionAffinityRouter(RequestRouter):
    """No FIFO mixin: a replica chosen for one session must serve that very request, not the oldest waiting."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        session_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not session_id or len(candidate_replicas) < 2:
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[i] for i in rendezvous_rank(session_id, list(by_id))]
        return [ranked[:1], ranked[1:]]
