"""Router deployment: one replica per application holding ``RouterState`` (see routing/router.py).

It also keeps the *emulated* link conditions that the admin API sets, so that every device replica
applies the same settings; the decision code never reads them (it sees only measured estimates).
Every method takes and returns typed values (pydantic models, dataclasses), by keyword.
"""

from __future__ import annotations

from typing import Any

from aiflow_ray.config import AppArgs, LinkConfig
from aiflow_ray.routing.router import GenerationReport, LoadReport, Routed, RouteRequest, RouterState


class RouterServer:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        self.state = RouterState(self.args.router)
        self.emulated_links: dict[str, LinkConfig] = {}

    def _link(self, link_id: str) -> LinkConfig:
        return self.emulated_links.get(link_id, self.args.link)

    async def decide(self, req: RouteRequest) -> Routed:
        return Routed(self.state.decide(req), self._link(req.link_id))

    async def report_generation(self, report: GenerationReport) -> None:
        self.state.report_generation(report)

    async def report_load(self, report: LoadReport) -> None:
        self.state.report_load(report)

    async def set_emulated_link(self, link_id: str, bandwidth_bps: float, rtt_s: float) -> LinkConfig:
        self.emulated_links[link_id] = self.args.link.model_copy(update={"bandwidth_bps": bandwidth_bps,
                                                                          "rtt_s": rtt_s})
        return self.emulated_links[link_id]

    async def emulated_link(self, link_id: str) -> LinkConfig | None:
        """The emulator's settings for a link set through the admin API, for the device replicas that
        emulate it (not for decisions)."""
        return self.emulated_links.get(link_id)

    async def snapshot(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        snap["emulated_links"] = {k: {"bandwidth_bps": v.bandwidth_bps, "rtt_s": v.rtt_s}
                                  for k, v in self.emulated_links.items()}
        return snap
