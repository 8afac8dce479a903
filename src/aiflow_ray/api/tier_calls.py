"""The ingress's calls to the other deployments, each with its deadline.

A tier that dies, is unreachable or misses its deadline raises ``TierUnavailable`` (a 503 with
Retry-After at the boundary, never a bare 500). The router is one replica: while Serve replaces it,
the ingress decides from the router's last saved state. The device tier gets one retry when its
replica dies before answering: nothing has reached the client yet, and greedy or seeded output comes
out the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from prometheus_client import generate_latest
from ray.serve.exceptions import BackPressureError

from aiflow_ray import calls
from aiflow_ray.api import metrics
from aiflow_ray.api.errors import ApiError
from aiflow_ray.api.schemas import LinkUpdate
from aiflow_ray.config import AppArgs, GenerateOptions
from aiflow_ray.errors import Refusal
from aiflow_ray.logging_utils import clip, get_logger
from aiflow_ray.routing.messages import LoadReport, Routed, RouteRequest
from aiflow_ray.routing.router import RouterState
from aiflow_ray.tiers.results import TierResult
from aiflow_ray.tiers.trace import Trace, decode_tpot_s
from aiflow_ray.units import parse_bandwidth_bps

log = get_logger(__name__)

FALLBACK_STATE_TTL_S = 5.0  # how long the ingress reuses the router's saved state while the router is away
DEVICE_GRACE_S = 10.0  # the device tier ends a request at its deadline; the ingress waits this much longer


class TierCalls:
    args: AppArgs
    device: Any
    cloud: Any
    router: Any
    _fallback: tuple[float, RouterState, dict[str, Any]] | None

    @staticmethod
    async def _call(tier: str, handle: Any, method: str, timeout_s: float, *args: Any) -> Any:
        """A call to a deployment with its deadline; a dead, unreachable or late replica raises
        ``TierUnavailable``."""
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout_s)
        except Exception as exc:
            if calls.is_retryable(exc):
                raise calls.TierUnavailable(tier, calls.describe(exc)) from exc
            raise

    def _report_outcome(self, routed: Routed, trace: Trace, prompt_tokens: int = 0) -> None:
        """The measured TTFT and TPOT go back to the router beside its prediction (fire and forget)."""
        if not routed.decision.request_id:
            return
        try:
            path = trace.path
            # On the device no image crosses the link: what it would have taken is unknown.
            images = () if path == "on-device" else tuple(trace.image_bytes_each)
            accepted, drafted = trace.accepted, trace.draft_lens
            tpot_s, num_tokens = trace.tpot_s, trace.num_tokens
            if trace.switched_at > 0:  # judged by its rounds: the rest was another path's pace
                tpot_s, num_tokens = decode_tpot_s(trace.token_times_s[:trace.switched_at]), trace.switched_at
            self.router.report_outcome.remote(routed.decision.request_id, path, trace.ttft_s, tpot_s,
                                              num_tokens, images, accepted=int(sum(accepted)),
                                              rejections=sum(1 for a, k in zip(accepted, drafted, strict=False)
                                                             if a < k), prompt_tokens=int(prompt_tokens))
        except Exception as exc:  # the router is being replaced: this one measurement is lost, nothing else
            log.warning("could not report an outcome to the router: %s", type(exc).__name__)

    def _report_end(self, routed: Routed) -> None:
        """A request that ended without an outcome (a failure, a tier's refusal, a client gone): the router
        stops counting it against its tier's queue (fire and forget)."""
        if not routed.decision.request_id or routed.decision.path is None:
            return
        try:
            self.router.report_end.remote(routed.decision.request_id)
        except Exception as exc:  # the router is being replaced: its count expires the entry at the deadline
            log.warning("could not report a request's end to the router: %s", type(exc).__name__)

    async def _router_call(self, method: str, *args: Any) -> Any:
        return await self._call("router", self.router, method, self.args.deadlines.router_call_s, *args)

    async def _decide_without_router(self, request: RouteRequest, exc: calls.TierUnavailable) -> Routed:
        """No router answered: decide here, from the router's last saved state, as if every tier were up.

        The router is one replica; while Serve replaces it, requests go on. A tier that is in fact down
        still fails fast (every call has a deadline, edge calls fail over), so assuming it up costs little.
        """
        from aiflow_ray.routing.persistence import emulated_links_of, load_saved_state, restore_state

        now = time.monotonic()
        if self._fallback is None or now - self._fallback[0] > FALLBACK_STATE_TTL_S:
            saved = await asyncio.to_thread(load_saved_state, self.args.name)
            state = RouterState(self.args.router)
            if saved:
                restore_state(state, saved)
            self._fallback = (now, state, emulated_links_of(self.args, saved))
        _, state, links = self._fallback
        for tier in ("edge", "cloud"):
            capacity = self.args.tier(tier).max_ongoing_requests * self.args.tier(tier).autoscaling.max_replicas
            state.report_load(LoadReport(tier=tier, replica="assumed", ongoing=0, queued=0, capacity=capacity))
        decision = state.decide(request)
        decision.reason = f"decided by the ingress (router unavailable: {exc.reason}); {decision.reason}"
        log.warning("router unavailable (%s): the ingress decided %s", exc.reason, decision.path)
        return Routed(decision, links.get(request.link_id, self.args.link))

    async def _call_device(self, opts: GenerateOptions) -> TierResult | Refusal:
        """The device tier runs the request; a replica that dies before answering gets one retry elsewhere
        (nothing was sent to the client yet, and greedy or seeded output comes out the same)."""
        for attempt in (1, 2):
            try:
                result: TierResult | Refusal = await asyncio.wait_for(
                    self.device.generate.remote(opts), self.args.deadlines.request_s + DEVICE_GRACE_S)
                return result
            except Exception as exc:
                if not calls.is_retryable(exc) or isinstance(exc, BackPressureError | TimeoutError) or attempt == 2:
                    raise
                log.warning("the device tier failed (%s); retrying the request once", calls.describe(exc))
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def _open_device_stream(self, opts: GenerateOptions) -> tuple[Any, Any]:
        """The device's stream and its first event, with the same single retry as ``_call_device``."""
        for attempt in (1, 2):
            stream = self.device.options(stream=True).generate_stream.remote(opts)
            try:
                first = await asyncio.wait_for(stream.__anext__(), self.args.deadlines.request_s + DEVICE_GRACE_S)
                return stream, first
            except Exception as exc:
                stream.cancel()
                if not calls.is_retryable(exc) or isinstance(exc, BackPressureError | TimeoutError) or attempt == 2:
                    raise
                log.warning("the device tier failed (%s); retrying the stream once", calls.describe(exc))
                await asyncio.sleep(0.5)
        raise AssertionError("unreachable")

    async def _cloud_call(self, method: str, *args: Any) -> Any:
        return await self._call("cloud", self.cloud, method, self.args.deadlines.cloud_call_s, *args)

    # -- knowledge base -------------------------------------------------------------------------

    # -- the router's state, for the API ----------------------------------------------------------
    async def router_state(self) -> Any:
        return await self._router_call("snapshot")

    async def metrics_text(self) -> str:
        """The Prometheus exposition, with the router's view of the tiers refreshed first (a router being
        replaced leaves those gauges as last seen)."""
        with contextlib.suppress(calls.TierUnavailable):
            metrics.observe_router(await self._router_call("snapshot"))
        return generate_latest(metrics.REGISTRY).decode()

    async def set_link(self, link_id: str, update: LinkUpdate) -> Any:
        if update.bandwidth_bps is None and update.bandwidth is None:
            raise ApiError(400, "give bandwidth_bps or bandwidth", "bandwidth_bps")
        try:
            # 0 is an outage, not a missing value.
            bps = update.bandwidth_bps if update.bandwidth_bps is not None else parse_bandwidth_bps(
                update.bandwidth or "", allow_zero=True)
        except ValueError:
            raise ApiError(400, f"bandwidth '{clip(update.bandwidth)}' is not a positive bandwidth such as "
                           "'500KB/s', '1MB/s', '8Mbit/s' or bytes/s", "bandwidth") from None
        link = await self._router_call("set_emulated_link", link_id, bps, update.rtt_ms / 1000.0)
        return {"link_id": link_id, "bandwidth_bps": link.bandwidth_bps, "rtt_s": link.rtt_s}
