"""Link emulation: delay = one-way latency + bytes / bandwidth(t), FIFO per direction.

On one machine the tiers share a host, so every cross-tier payload passes through a ``Link``.
Bandwidth follows a trace (constant, steps, or a CSV file of ``at_s,bandwidth_bps``); a transfer
that spans a step is integrated piecewise. Transfers on one direction queue behind each other
(``busy_until``), as on a real serial link. Bandwidth is in bytes per second.

Two clocks: ``RealClock`` sleeps; ``VirtualClock`` measures compute in real time but adds link delays
without waiting, so a benchmark can replay one compute run over several emulated links. Conditions
can be changed at run time (``set_trace``), for tests that show estimators and policies adapting.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiflow_ray.config import LinkConfig

PRESETS_BPS: dict[str, float] = {"500KB/s": 500e3, "1MB/s": 1e6, "2MB/s": 2e6}


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, deadline: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)


class VirtualClock:
    """Real elapsed time plus the link delays that were 'slept' without waiting."""

    def __init__(self) -> None:
        self._offset = 0.0

    def now(self) -> float:
        return time.perf_counter() + self._offset

    def sleep_until(self, deadline: float) -> None:
        remaining = deadline - self.now()
        if remaining > 0:
            self._offset += remaining


class BandwidthTrace:
    """Piecewise-constant bandwidth over time since the link started."""

    def __init__(self, steps: list[tuple[float, float]]) -> None:
        if not steps:
            raise ValueError("a trace needs at least one step")
        steps = sorted(steps)
        if steps[0][0] != 0.0:
            steps.insert(0, (0.0, steps[0][1]))
        if any(bw <= 0 for _, bw in steps):
            raise ValueError("bandwidths must be positive")
        self.times = [t for t, _ in steps]
        self.rates = [bw for _, bw in steps]

    @classmethod
    def constant(cls, bandwidth_bps: float) -> BandwidthTrace:
        return cls([(0.0, bandwidth_bps)])

    @classmethod
    def from_csv(cls, path: Path) -> BandwidthTrace:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or not {"at_s", "bandwidth_bps"} <= set(rows[0]):
            raise ValueError(f"{path}: need a header with columns at_s,bandwidth_bps")
        return cls([(float(r["at_s"]), float(r["bandwidth_bps"])) for r in rows])

    def bandwidth_at(self, t: float) -> float:
        return self.rates[max(bisect.bisect_right(self.times, t) - 1, 0)]

    def transmit_s(self, num_bytes: float, start: float) -> float:
        """Seconds to push ``num_bytes`` starting at ``start`` (integrating across steps)."""
        remaining = float(num_bytes)
        t = start
        i = max(bisect.bisect_right(self.times, t) - 1, 0)
        while True:
            rate = self.rates[i]
            end = self.times[i + 1] if i + 1 < len(self.times) else float("inf")
            capacity = (end - t) * rate
            if remaining <= capacity:
                return t + remaining / rate - start
            remaining -= capacity
            t = end
            i += 1


@dataclass
class LinkStats:
    transfers: int = 0
    bytes: int = 0
    delay_s: float = 0.0


@dataclass
class Link:
    """One direction of an emulated link."""

    trace: BandwidthTrace
    one_way_latency_s: float
    clock: Clock
    started_at: float = field(default=0.0)
    stats: LinkStats = field(default_factory=LinkStats)

    def __post_init__(self) -> None:
        self._busy_until = self.clock.now()
        self.started_at = self._busy_until
        self._lock = threading.Lock()

    def set_trace(self, trace: BandwidthTrace, one_way_latency_s: float | None = None) -> None:
        """Change conditions at run time; the new trace's time 0 is now."""
        with self._lock:
            self.trace = trace
            self.started_at = self.clock.now()
            if one_way_latency_s is not None:
                self.one_way_latency_s = one_way_latency_s

    def schedule(self, num_bytes: int, send_at: float | None = None) -> float:
        """Queue a payload handed to the link at ``send_at``; return when it fully arrives."""
        with self._lock:
            now = self.clock.now() if send_at is None else send_at
            start = max(now, self._busy_until)
            done = start + self.trace.transmit_s(num_bytes, start - self.started_at)
            self._busy_until = done
            arrival = done + self.one_way_latency_s
            self.stats.transfers += 1
            self.stats.bytes += num_bytes
            self.stats.delay_s += arrival - now
            return arrival

    def transfer(self, num_bytes: int) -> float:
        """Send now and block (on the link's clock) until it arrives; return the delay."""
        sent = self.clock.now()
        arrival = self.schedule(num_bytes, sent)
        self.clock.sleep_until(arrival)
        return arrival - sent

    async def transfer_async(self, num_bytes: int) -> float:
        sent = self.clock.now()
        arrival = self.schedule(num_bytes, sent)
        if isinstance(self.clock, RealClock):
            await asyncio.sleep(max(arrival - self.clock.now(), 0.0))
        else:
            self.clock.sleep_until(arrival)
        return arrival - sent


@dataclass
class DuplexLink:
    up: Link  # device -> edge
    down: Link  # edge -> device
    clock: Clock

    @classmethod
    def from_config(cls, cfg: LinkConfig, clock: Clock | None = None) -> DuplexLink:
        clock = clock or (VirtualClock() if cfg.virtual_time else RealClock())
        if cfg.trace_csv is not None:
            trace = BandwidthTrace.from_csv(cfg.trace_csv)
        elif cfg.steps:
            trace = BandwidthTrace([(s.at_s, s.bandwidth_bps) for s in cfg.steps])
        else:
            trace = BandwidthTrace.constant(cfg.bandwidth_bps)
        one_way = cfg.rtt_s / 2
        return cls(Link(trace, one_way, clock), Link(trace, one_way, clock), clock)

    def set_conditions(self, bandwidth_bps: float, rtt_s: float | None = None) -> None:
        trace = BandwidthTrace.constant(bandwidth_bps)
        one_way = None if rtt_s is None else rtt_s / 2
        self.up.set_trace(trace, one_way)
        self.down.set_trace(trace, one_way)
