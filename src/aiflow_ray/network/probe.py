"""Active link probes: a small and a padded PING, each timed over a round trip.

The router estimates bandwidth and RTT from (bytes, seconds) round trips. Speculative rounds all move
about a hundred bytes, so they pin down the time of such a round but not how it splits into RTT and
bytes / bandwidth, and a device answering on its own sends nothing at all, leaving the estimate to
go stale exactly when the router should notice that the link recovered. A probe pair fixes both: two
sizes far apart identify the slope, and probes keep flowing while the link is otherwise idle. The
padding is zeros; the edge answers without queueing behind model work.
"""

from __future__ import annotations

from collections.abc import Callable

from aiflow_ray.network import wire
from aiflow_ray.network.link import Clock

PROBE_SESSION = bytes(16)


def probe_link(exchange: Callable[[bytes], bytes], clock: Clock, padding_bytes: int, seq: int = 0
               ) -> list[tuple[int, float]]:
    """Send a bare and a padded probe; return (bytes up + down, seconds) for each round trip."""
    samples = []
    for i, padding in enumerate((0, padding_bytes)):
        payload = wire.encode_ping(wire.Ping(wire.Header(wire.MsgType.PING, PROBE_SESSION, seq + i), padding))
        sent = clock.now()
        reply = exchange(payload)
        elapsed = clock.now() - sent
        if not isinstance(wire.decode(reply), wire.Pong):
            raise wire.WireError("the edge did not answer the probe")
        samples.append((len(payload) + len(reply), elapsed))
    return samples
