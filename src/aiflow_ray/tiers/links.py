"""The device links one drafter replica serves, and the prober that keeps their estimates current.

A drafter replica stands in for every device whose requests reach it, so it keeps one emulated link
and one draft-length policy per link id (per device), bounded by LRU. The policy carries what the
device learned across requests (acceptance, compute and link estimates).

A link quiet for ``interval_s`` is probed (a bare and a padded PING back to back, see
network/probe.py): without probes, a router that moved a device's requests on-device because its
link was slow would never see the link recover. Free of Ray: the prober is given callables for the
probe exchange, the emulated settings and the report sink.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from aiflow_ray.config import DraftPolicyConfig, LinkConfig, LinkProbeArgs
from aiflow_ray.logging_utils import clip, get_logger
from aiflow_ray.network.link import DuplexLink, RealClock
from aiflow_ray.network.probe import probe_link
from aiflow_ray.speculative.policy import AdaptiveDraftLen

log = get_logger(__name__)

Sample = tuple[int, float]  # (bytes, seconds) of one round trip


@dataclass
class DeviceLink:
    """One device's emulated link, its draft-length policy, and when the link last carried traffic."""

    link: DuplexLink
    policy: AdaptiveDraftLen
    settings: tuple[float, float]  # (bandwidth_bps, rtt_s) the emulator runs at
    last_traffic_at: float = field(default_factory=time.monotonic)  # last link measurement
    last_request_at: float = field(default_factory=time.monotonic)


class LinkRegistry:
    def __init__(self, max_draft_len: int, max_links: int = 256) -> None:
        self.max_draft_len = max_draft_len
        self.max_links = max_links
        self._links: OrderedDict[str, DeviceLink] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._links)

    def get(self, link_id: str, cfg: LinkConfig) -> DeviceLink:
        """The device's link, created on first use, running at the emulated conditions ``cfg``."""
        with self._lock:
            state = self._links.get(link_id)
            if state is None:
                policy = AdaptiveDraftLen(DraftPolicyConfig(policy="adaptive", max_draft_len=self.max_draft_len))
                state = DeviceLink(DuplexLink.from_config(cfg, RealClock()), policy, (cfg.bandwidth_bps, cfg.rtt_s))
                self._links[link_id] = state
                while len(self._links) > self.max_links:
                    self._links.popitem(last=False)
            self._links.move_to_end(link_id)
        if (cfg.bandwidth_bps, cfg.rtt_s) != state.settings:
            state.link.set_conditions(cfg.bandwidth_bps, cfg.rtt_s)
            state.settings = (cfg.bandwidth_bps, cfg.rtt_s)
        return state

    def due_for_probe(self, interval_s: float, idle_stop_s: float) -> list[tuple[str, DeviceLink]]:
        """Links quiet for ``interval_s`` whose device sent a request within ``idle_stop_s``."""
        now = time.monotonic()
        with self._lock:
            return [(lid, st) for lid, st in self._links.items()
                    if now - st.last_traffic_at >= interval_s and now - st.last_request_at <= idle_stop_s]


class LinkProber:
    """A daemon thread: runs ``on_tick`` (start-up chores) and probes quiet links every half interval.

    ``settings(link_id)`` returns the emulated (bandwidth_bps, rtt_s) set for a link, or None;
    ``exchange(link, payload)`` sends one probe over that link; ``report(link_id, small, big)``
    publishes a measured pair. Failures (an edge restarting, a router not up yet) are retried at
    the next tick.
    """

    def __init__(self, registry: LinkRegistry, cfg: LinkProbeArgs, base_link: LinkConfig,
                 exchange: Callable[[DuplexLink, bytes], bytes],
                 settings: Callable[[str], tuple[float, float] | None],
                 report: Callable[[str, Sample, Sample], None],
                 on_tick: Callable[[], None] | None = None) -> None:
        self.registry, self.cfg, self.base_link = registry, cfg, base_link
        self.exchange, self.settings, self.report, self.on_tick = exchange, settings, report, on_tick
        self._stop = threading.Event()
        self._seq = 0

    def start(self) -> None:
        threading.Thread(target=self._run, name="aiflow-link-prober", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s / 2):
            if self.on_tick is not None:
                self.on_tick()
            if self.cfg.enabled:
                self.probe_due()

    def probe_due(self) -> int:
        """Probe every link that is due; returns how many were measured."""
        measured = 0
        for link_id, state in self.registry.due_for_probe(self.cfg.interval_s, self.cfg.idle_stop_s):
            try:
                # The emulated conditions live with the router (the admin API sets them there); asking
                # costs one call per probe, not per request.
                current = self.settings(link_id)
                if current is not None:
                    bandwidth_bps, rtt_s = current
                    self.registry.get(link_id, self.base_link.model_copy(
                        update={"bandwidth_bps": bandwidth_bps, "rtt_s": rtt_s}))
                small, big = probe_link(functools.partial(self.exchange, state.link), state.link.clock,
                                        self.cfg.padding_bytes, self._seq)
                self._seq += 2
            except Exception as exc:
                log.debug("link probe on %s failed: %s", clip(link_id), clip(exc, 200))
                continue
            state.last_traffic_at = time.monotonic()
            state.policy.link.observe_pair(small, big)
            measured += 1
            try:
                self.report(link_id, small, big)
            except Exception as exc:
                log.debug("could not report a probe: %s", exc)
        return measured
