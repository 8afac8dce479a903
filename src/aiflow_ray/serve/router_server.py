"""Router deployment: one replica per application holding ``RouterState`` (see routing/router.py).

It also keeps the *emulated* link conditions that the admin API sets, so that every device replica
applies the same settings; the decision code never reads them (it sees only measured estimates).
Every method takes and returns typed values (pydantic models, dataclasses), by keyword.

State survives a restart of this replica: the emulated links (at once, when set) and the estimates
(every few seconds, when they changed) are saved in the cluster's key-value store (GCS), which
outlives any replica, and a new router starts from them. The ingress reads the same record to decide
on its own while no router answers.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiflow_ray.config import AppArgs, LinkConfig
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.routing.messages import GenerationReport, LoadReport, Routed, RouteRequest
from aiflow_ray.routing.persistence import emulated_links_of, export_state, load_saved_state, restore_state, save_state
from aiflow_ray.routing.router import RouterState

log = get_logger(__name__)

SAVE_PERIOD_S = 2.0
NODES_PERIOD_S = 2.0
MAX_EMULATED_LINKS = 4096  # admin settings kept (and saved); the oldest is dropped beyond


def shared_host(nodes: list[dict[str, Any]]) -> bool:
    """Every live Ray node on one address: the tiers share that host's CPUs (the local cluster, whose nodes are
    processes on 127.0.0.1, or a one-pod install). Separate pods or machines have addresses of their own."""
    return len({n.get("NodeManagerAddress") for n in nodes if n.get("Alive")}) == 1


class RouterServer:
    def __init__(self, args: dict[str, Any], persist: bool = True) -> None:
        """``persist=False`` (unit tests) keeps the state in memory only."""
        self.args = AppArgs.model_validate(args)
        self.state = RouterState(self.args.router, {tier: self.args.tier(tier).max_queued_requests
                                                    for tier in ("device", "edge", "cloud")},
                                 self.args.deadlines.request_s)
        self.persist = persist
        saved = load_saved_state(self.args.name) if persist else None
        if saved:
            restore_state(self.state, saved)
            log.info("router restored its saved state: %d links, %d emulated links",
                     len(self.state.links), len(saved.get("emulated_links") or {}))
        self.emulated_links: dict[str, LinkConfig] = emulated_links_of(self.args, saved)
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        if self._task is None and self.persist:
            self._task = asyncio.get_running_loop().create_task(self._background())

    def _export(self) -> dict[str, Any]:
        state = export_state(self.state)
        state["emulated_links"] = {k: {"bandwidth_bps": v.bandwidth_bps, "rtt_s": v.rtt_s}
                                   for k, v in self.emulated_links.items()}
        return state

    async def _save(self) -> None:
        self._dirty = False
        await asyncio.to_thread(save_state, self.args.name, self._export())

    async def _background(self) -> None:
        """Save changed estimates, and learn which nodes died (their orphaned workers' load reports are void)."""
        import ray

        last_nodes = 0.0
        while True:
            await asyncio.sleep(min(SAVE_PERIOD_S, NODES_PERIOD_S))
            try:
                if self._dirty:
                    await self._save()
                if time.monotonic() - last_nodes >= NODES_PERIOD_S:
                    nodes = await asyncio.to_thread(ray.nodes)
                    self.state.dead_nodes = {n["NodeID"] for n in nodes if not n.get("Alive")}
                    self.state.shared_host = shared_host(nodes)
                    last_nodes = time.monotonic()
            except Exception as exc:
                log.warning("router background work failed: %s", type(exc).__name__)

    def _link(self, link_id: str) -> LinkConfig:
        return self.emulated_links.get(link_id, self.args.link)

    async def decide(self, req: RouteRequest) -> Routed:
        self._start()
        return Routed(self.state.decide(req), self._link(req.link_id))

    async def report_generation(self, report: GenerationReport) -> None:
        self._start()
        self.state.report_generation(report)
        self._dirty = True

    async def report_outcome(self, request_id: str, path: str, ttft_s: float, tpot_s: float,
                             num_tokens: int, image_bytes_sent: tuple[int, ...] = (), accepted: int = 0,
                             rejections: int = 0, prompt_tokens: int = 0) -> None:
        self.state.report_outcome(request_id, path, ttft_s, tpot_s, num_tokens, image_bytes_sent, accepted,
                                  rejections, prompt_tokens)

    async def report_end(self, request_id: str) -> None:
        self.state.report_end(request_id)

    async def report_load(self, report: LoadReport) -> None:
        self._start()
        self.state.report_load(report)
        self._dirty = self._dirty or bool(report.service_samples)

    async def set_emulated_link(self, link_id: str, bandwidth_bps: float, rtt_s: float) -> LinkConfig:
        self.emulated_links.pop(link_id, None)  # re-inserted last: the oldest setting goes first when full
        self.emulated_links[link_id] = self.args.link.model_copy(update={"bandwidth_bps": bandwidth_bps,
                                                                          "rtt_s": rtt_s})
        while len(self.emulated_links) > MAX_EMULATED_LINKS:
            del self.emulated_links[next(iter(self.emulated_links))]
        if self.persist:
            await self._save()  # before answering: a setting the admin saw accepted survives a restart
        return self.emulated_links[link_id]

    async def tier_available(self, tier: str) -> bool:
        """Whether any replica of ``tier`` on a live node reported lately (the device asks before retrying)."""
        return self.state.tier_load(tier).available

    async def emulated_links_for(self, link_ids: list[str]) -> dict[str, tuple[float, float]]:
        """(bandwidth_bps, rtt_s) of those of ``link_ids`` set through the admin API: one call per device
        replica and tick, whatever the number of links in flight."""
        return {lid: (cfg.bandwidth_bps, cfg.rtt_s) for lid in link_ids if (cfg := self.emulated_links.get(lid))}

    async def emulated_link(self, link_id: str) -> LinkConfig | None:
        """The emulator's settings for a link set through the admin API, for the device replicas that
        emulate it (not for decisions)."""
        return self.emulated_links.get(link_id)

    async def snapshot(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        snap["emulated_links"] = {k: {"bandwidth_bps": v.bandwidth_bps, "rtt_s": v.rtt_s}
                                  for k, v in self.emulated_links.items()}
        return snap

    async def check_health(self) -> None:
        self._start()
