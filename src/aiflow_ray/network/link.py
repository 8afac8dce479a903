"""Link emulation: delay = one-way latency + bytes / bandwidth(t), FIFO per direction.

On one machine the tiers share a host, so every cross-tier payload passes through a ``Link``.
Bandwidth follows a trace (constant, steps, or a CSV file of ``at_s,bandwidth_bps``); a transfer
that spans a step is integrated piecewise. Transfers on one direction queue behind each other, as on
a real serial link. Bandwidth is in bytes per second; 0 is an outage: nothing moves until it is
positive again.

Two clocks: ``RealClock`` sleeps; ``VirtualClock`` measures compute in real time but adds link delays
without waiting, so a benchmark can replay one compute run over several emulated links. Conditions
can be changed at run time (``set_trace``), for tests that show estimators and policies adapting.
A change re-times what is queued or in flight: the bytes not yet sent at that moment go at the new
rate, so a payload queued during an outage leaves when the link comes back, not when the outage
rate would have let it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import csv
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aiflow_ray.config import LinkConfig

PRESETS_BPS: dict[str, float] = {"500KB/s": 500e3, "1MB/s": 1e6, "2MB/s": 2e6}


class LinkTimeout(TimeoutError):
    """A payload had not arrived when its deadline passed; the link dropped what it had not sent."""

    def __init__(self, num_bytes: int, waited_s: float) -> None:
        super().__init__(f"{num_bytes} bytes did not arrive within {waited_s:.3f} s")
        self.num_bytes = num_bytes
        self.waited_s = waited_s

    def __reduce__(self) -> tuple[type[LinkTimeout], tuple[int, float]]:
        # The default pickling re-calls __init__ with the message alone; Ray ships exceptions pickled.
        return (LinkTimeout, (self.num_bytes, self.waited_s))


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
    """Piecewise-constant bandwidth over time since the link started; a step of 0 is an outage."""

    def __init__(self, steps: list[tuple[float, float]]) -> None:
        if not steps:
            raise ValueError("a trace needs at least one step")
        steps = sorted(steps)
        if steps[0][0] != 0.0:
            steps.insert(0, (0.0, steps[0][1]))
        if any(not bw >= 0 for _, bw in steps):  # also rejects NaN
            raise ValueError("bandwidths must be >= 0 bytes/s (0 = outage)")
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
        """Seconds to push ``num_bytes`` starting at ``start`` (integrating across steps).

        ``inf`` when the bytes meet a zero-rate step that no positive step follows.
        """
        remaining = float(num_bytes)
        if remaining <= 0:
            return 0.0
        t = start
        i = max(bisect.bisect_right(self.times, t) - 1, 0)
        while True:
            rate = self.rates[i]
            end = self.times[i + 1] if i + 1 < len(self.times) else math.inf
            if rate > 0:
                capacity = (end - t) * rate
                if remaining <= capacity:
                    return t + remaining / rate - start
                remaining -= capacity
            elif end == math.inf:
                return math.inf
            t = end
            i += 1

    def capacity_bytes(self, start: float, end: float) -> float:
        """Bytes the trace can push between ``start`` and ``end``."""
        total = 0.0
        t = start
        i = max(bisect.bisect_right(self.times, t) - 1, 0)
        while t < end:
            step_end = min(self.times[i + 1] if i + 1 < len(self.times) else math.inf, end)
            if self.rates[i] > 0:
                total += (step_end - t) * self.rates[i]
            t = step_end
            i += 1
        return total


@dataclass
class LinkStats:
    transfers: int = 0
    bytes: int = 0
    delay_s: float = 0.0  # arrival - hand-over as known when queued; a payload facing an endless outage adds 0
    timeouts: int = 0


@dataclass(eq=False)
class _Transfer:
    """One queued payload. ``unsent_bytes`` is what had not left by the link's reference time."""

    num_bytes: int
    send_at: float
    unsent_bytes: float
    done_at: float = math.inf  # when its last byte leaves the sender
    arrival: float = math.inf


@dataclass
class Link:
    """One direction of an emulated link.

    A FIFO of payloads: each starts once it is handed over and the one before it has left, and its
    bytes leave at the trace's rate. Sent bytes are accounted up to a reference time (the last change
    of conditions, or the moment the link last went idle); a change moves the reference to now, so the
    bytes still unsent go at the new rate and every queued arrival is recomputed. A payload that has
    fully left keeps the latency it left with.
    """

    trace: BandwidthTrace
    one_way_latency_s: float
    clock: Clock
    started_at: float = field(default=0.0)
    stats: LinkStats = field(default_factory=LinkStats)

    def __post_init__(self) -> None:
        self.started_at = self.clock.now()
        self._ref_at = self.started_at
        self._queue: deque[_Transfer] = deque()
        self._changed = threading.Condition(threading.Lock())
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def set_trace(self, trace: BandwidthTrace, one_way_latency_s: float | None = None) -> None:
        """Change conditions at run time; the new trace's time 0 is now. Queued payloads are re-timed."""
        with self._changed:
            now = self.clock.now()
            self._advance(now)
            self.trace = trace
            self.started_at = now
            if one_way_latency_s is not None:
                self.one_way_latency_s = one_way_latency_s
            self._retime()
            self._notify()

    def schedule(self, num_bytes: int, send_at: float | None = None) -> float:
        """Queue a payload handed to the link at ``send_at`` (default now); return when it fully arrives.

        The arrival is the one known now: a later ``set_trace`` moves it (``transfer`` follows such
        moves, a caller sleeping until this value does not), and it is ``inf`` while the payload waits
        on an outage that the trace never ends.
        """
        with self._changed:
            now = self.clock.now()
            return self._enqueue(num_bytes, now if send_at is None else send_at, now).arrival

    def transfer(self, num_bytes: int, timeout_s: float | None = None) -> float:
        """Send now and block (on the link's clock) until it arrives; return the delay.

        A change of conditions wakes the wait and re-times it. With ``timeout_s``, a payload that has not
        arrived by then is abandoned: its unsent bytes leave the queue, those behind it move up, and
        ``LinkTimeout`` is raised. On a clock that skips its waits (``VirtualClock``) nothing can change
        the conditions during a wait, so a payload that would never arrive raises at once, with
        ``waited_s`` inf.
        """
        with self._changed:
            sent = self.clock.now()
            entry = self._enqueue(num_bytes, sent, sent)
            deadline = math.inf if timeout_s is None else sent + timeout_s
            while (wake_at := self._wake_at(entry, sent, deadline)) is not None:
                if isinstance(self.clock, RealClock):
                    remaining_s = wake_at - self.clock.now()
                    self._changed.wait(None if remaining_s == math.inf else max(remaining_s, 0.0))
                else:
                    self.clock.sleep_until(wake_at)
            return entry.arrival - sent

    async def transfer_async(self, num_bytes: int, timeout_s: float | None = None) -> float:
        """``transfer`` for an event loop: waits without blocking it, woken by changes as well."""
        if not isinstance(self.clock, RealClock):
            return self.transfer(num_bytes, timeout_s)
        changed = asyncio.Event()
        waiter = (asyncio.get_running_loop(), changed)
        with self._changed:
            sent = self.clock.now()
            entry = self._enqueue(num_bytes, sent, sent)
            self._async_waiters.add(waiter)
        deadline = math.inf if timeout_s is None else sent + timeout_s
        try:
            while True:
                with self._changed:
                    changed.clear()
                    wake_at = self._wake_at(entry, sent, deadline)
                    if wake_at is None:
                        return entry.arrival - sent
                    remaining_s = wake_at - self.clock.now()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), None if remaining_s == math.inf else max(remaining_s, 0.0))
        finally:
            with self._changed:
                self._async_waiters.discard(waiter)

    # -- the queue; every method below runs under self._changed ---------------------------------
    def _enqueue(self, num_bytes: int, send_at: float, now: float) -> _Transfer:
        self._prune(now)
        entry = _Transfer(num_bytes, send_at, float(num_bytes))
        self._time(entry, self._queue[-1].done_at if self._queue else self._ref_at)
        self._queue.append(entry)
        self.stats.transfers += 1
        self.stats.bytes += num_bytes
        if entry.arrival < math.inf:
            self.stats.delay_s += entry.arrival - send_at
        return entry

    def _time(self, entry: _Transfer, ready_at: float) -> None:
        start = max(ready_at, entry.send_at)
        if start == math.inf:  # stuck behind a payload that never leaves
            entry.done_at = entry.arrival = math.inf
            return
        entry.done_at = start + self.trace.transmit_s(entry.unsent_bytes, start - self.started_at)
        entry.arrival = entry.done_at + self.one_way_latency_s

    def _retime(self) -> None:
        ready_at = self._ref_at
        for entry in self._queue:
            self._time(entry, ready_at)
            ready_at = entry.done_at

    def _prune(self, now: float) -> None:
        """Drop payloads that have fully left; the reference moves to when the last of them did."""
        while self._queue and self._queue[0].done_at <= now:
            self._ref_at = max(self._ref_at, self._queue.popleft().done_at)

    def _advance(self, now: float) -> None:
        """Account what left by ``now`` under the current trace and make ``now`` the reference."""
        self._prune(now)
        if self._queue:
            head = self._queue[0]
            start = max(self._ref_at, head.send_at)
            if start < now:
                sent_bytes = self.trace.capacity_bytes(start - self.started_at, now - self.started_at)
                head.unsent_bytes = max(head.unsent_bytes - sent_bytes, 0.0)
        self._ref_at = max(self._ref_at, now)

    def _wake_at(self, entry: _Transfer, sent: float, deadline: float) -> float | None:
        """None once ``entry`` arrived; raises LinkTimeout past ``deadline``; else when to look again."""
        now = self.clock.now()
        if entry.arrival <= now:
            return None
        wake_at = min(entry.arrival, deadline)
        never = wake_at == math.inf and not isinstance(self.clock, RealClock)
        if now >= deadline or never:
            self._advance(now)
            if entry in self._queue:
                self._queue.remove(entry)
            self._retime()
            self.stats.timeouts += 1
            self._notify()
            raise LinkTimeout(entry.num_bytes, math.inf if never else now - sent)
        return wake_at

    def _notify(self) -> None:
        self._changed.notify_all()
        for loop, event in self._async_waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed; its waiter is being dropped
                loop.call_soon_threadsafe(event.set)


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
        """Constant ``bandwidth_bps`` from now on, both ways (0 = outage); queued payloads are re-timed."""
        trace = BandwidthTrace.constant(bandwidth_bps)
        one_way = None if rtt_s is None else rtt_s / 2
        self.up.set_trace(trace, one_way)
        self.down.set_trace(trace, one_way)
