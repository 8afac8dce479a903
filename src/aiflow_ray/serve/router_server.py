"""Router deployment: one replica per application holding ``RouterState`` (see routing/router.py).

It also keeps the *emulated* link conditions that the admin API sets, so that every device replica
applies the same settings; the decision code never reads them (it sees only measured estimates).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, cast

from aiflow_ray.routing.policy import Quality
from aiflow_ray.routing.router import GenerationReport, RouterConfig, RouterState
from aiflow_ray.serve.args import AppArgs


class RouterServer:
    def __init__(self, args: dict[str, Any]) -> None:
        self.args = AppArgs.model_validate(args)
        r = self.args.router
        self.state = RouterState(RouterConfig(fast_slo_s_per_token=r.fast_slo_s_per_token,
                                              shed_to_device=r.shed_to_device, max_draft_len=r.max_draft_len))
        self.emulated_links: dict[str, tuple[float, float]] = {}

    async def decide(self, request_id: str, link_id: str, path: str, quality: str,
                     draft_len: int | None, prompt_bytes: int = 0, max_new_tokens: int = 64) -> dict[str, Any]:
        decision = self.state.decide(request_id, link_id, path, cast(Quality, quality), draft_len,
                                     prompt_bytes, max_new_tokens)
        out = asdict(decision)
        bandwidth_bps, rtt_s = self.emulated_links.get(
            link_id, (self.args.link.bandwidth_bps, self.args.link.rtt_s)
        )
        out["emulated_link"] = {"bandwidth_bps": bandwidth_bps, "rtt_s": rtt_s}
        return out

    async def report_generation(self, report: GenerationReport) -> None:
        self.state.report_generation(report)

    async def report_load(self, tier: str, replica: str, ongoing: int, queued: int, capacity: int,
                          service_samples: list[tuple[int, float]] | None = None) -> None:
        self.state.report_load(tier, replica, ongoing, queued, capacity, service_samples or [])

    async def set_emulated_link(self, link_id: str, bandwidth_bps: float, rtt_s: float) -> dict[str, float]:
        self.emulated_links[link_id] = (bandwidth_bps, rtt_s)
        return {"bandwidth_bps": bandwidth_bps, "rtt_s": rtt_s}

    async def emulated_link(self, link_id: str) -> dict[str, float] | None:
        """The emulator's settings for a link, for the device replicas that emulate it (not for decisions)."""
        if link_id not in self.emulated_links:
            return None
        bandwidth_bps, rtt_s = self.emulated_links[link_id]
        return {"bandwidth_bps": bandwidth_bps, "rtt_s": rtt_s}

    async def snapshot(self) -> dict[str, Any]:
        snap = self.state.snapshot()
        snap["emulated_links"] = {k: {"bandwidth_bps": b, "rtt_s": r} for k, (b, r) in self.emulated_links.items()}
        return snap
