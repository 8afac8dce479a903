"""The Router: live estimates and per-request path/draft-length decisions.

One named Ray actor per application holds the state; tiers push to it at most once per request
(generation summaries from the drafter) or once per load-report period (replica loads), never per
token, so it stays off the hot path. The estimators are the same ones the device uses locally: the
router never reads the link emulator's settings.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import asdict, replace
from typing import Any

from aiflow_ray.config import RouterArgs
from aiflow_ray.network.estimators import Ewma, ForwardCostCurve, LinkEstimator
from aiflow_ray.routing.messages import GenerationReport, LoadReport, RouteRequest
from aiflow_ray.routing.policy import Decision, RouteInputs, TierLoad, decide
from aiflow_ray.routing.prompt_size import PromptSize
from aiflow_ray.speculative.cost_model import ComputeCosts, LinkCosts

# A replica that has not reported for this many report periods (at least LOAD_STALE_MIN_S) is treated as gone:
# replicas report every period from their event loop, which the engine's thread never blocks.
LOAD_STALE_PERIODS = 5
LOAD_STALE_MIN_S = 3.0
MAX_PENDING_OUTCOMES = 4096  # decisions awaiting their request's measured outcome
ERRORS_KEPT = 100  # recent prediction errors per path
# A tier's drain rate comes from the gaps between its last completions while saturated, within this window.
DRAIN_GAPS_KEPT = 16
DRAIN_WINDOW_S = 120.0
DRAIN_MIN_GAPS = 3
TPOTS_KEPT = 8  # per path, the last measured TPOTs that admission sizes a queue from
TPOT_WINDOW_S = 60.0
# Acceptance per request class: a class's own counts, shrunk toward the shared estimate by this many
# pseudo-rounds, so a class with few requests borrows the estimate of all.
CLASS_PRIOR_ROUNDS = 4.0

# Which tier a path's requests wait for (admission counts them there).
# (The device tier runs every path's request from start to end.)
PATH_TIERS: dict[str, tuple[str, ...]] = {"on-device": ("device",), "device-edge": ("device", "edge"),
                                          "server-only": ("device", "edge"), "device-edge-cloud": ("device", "cloud")}
UNBOUNDED_QUEUE = 1_000_000


class RouterState:
    def __init__(self, cfg: RouterArgs | None = None, queue_limits: dict[str, int] | None = None,
                 request_deadline_s: float = 300.0) -> None:
        """``queue_limits``: per tier, the requests that may wait beyond its capacity (its deployment's
        ``max_queued_requests``; -1 unbounded). ``request_deadline_s``: a request's whole budget."""
        self.cfg = cfg or RouterArgs()
        self.queue_limits = {tier: UNBOUNDED_QUEUE if limit < 0 else limit
                             for tier, limit in (queue_limits or {"device": 32, "edge": 32, "cloud": 32}).items()}
        self.request_deadline_s = request_deadline_s
        # Requests admitted to a tier and not ended (request id -> (tier, admitted at)): the router's own
        # count, exact at once, where load reports lag a period behind. An entry whose end never came (its
        # ingress died) expires after the request deadline.
        self.in_flight: dict[str, tuple[tuple[str, ...], float]] = {}
        self.shared_host = False  # every node on one host's CPUs (set from the cluster's nodes; RouteInputs)
        # Per tier: (when, seconds since the previous completion) for completions while every slot was taken,
        # and when the last such completion came (None after one on a tier with free slots: a gap that spans
        # idle time says nothing about the pace).
        self._drain_gaps: dict[str, deque[tuple[float, float]]] = {}
        self._last_busy_end: dict[str, float | None] = {}
        self._tpots: dict[str, deque[tuple[float, float]]] = {}  # path -> (when, measured TPOT)
        # Request class -> [accepted tokens, rejections], decayed per request as the shared counts are.
        self.class_acceptance: dict[str, list[float]] = {}
        self.links: dict[str, LinkEstimator] = {}
        self.accepted = self.cfg.prior_alpha * 8.0
        self.rejected = (1 - self.cfg.prior_alpha) * 8.0
        # No initial value: the first measurement replaces the prior outright, so a prior sized for
        # one model pair cannot linger over another.
        self.draft_s = Ewma(0.2)
        # A drafted token costs more than an on-device one: a round's first step feeds the accepted draft and the
        # edge's token before it drafts. One average of both put on-device TPOT at the drafting cost (37.6 ms a
        # token against 30 measured on-device, local profile).
        self.on_device_s = Ewma(0.2)
        # Empty until the edge reports (its start-up calibration does): the prior is used only while
        # there is nothing measured, so a prior sized for another model pair cannot linger.
        # The edge's forward cost over tokens fed, from every forward it reports (calibration, prefills,
        # decodes, verifies): a monotone curve, since one line over all of them goes negative on llama.cpp.
        self.verify_cost = ForwardCostCurve(forget=0.95)
        # The drafter's first token over prompt tokens, from its calibrations (an idle device, as the edge's
        # forwards are): the device's prefill in TTFT.
        self.device_prefill = ForwardCostCurve(forget=0.9)
        # A prompt's tokens from its text's bytes and its images, learned from the requests' outcomes: the router
        # sees a request before anything tokenizes it.
        self.prompt_size = PromptSize()
        # The device tier reports too, but only admission reads it: an unreported device tier gates nothing.
        self.loads: dict[str, dict[str, tuple[float, TierLoad]]] = {"edge": {}, "cloud": {}}
        self.load_nodes: dict[str, str] = {}  # replica -> node id
        self.dead_nodes: set[str] = set()  # set by the router deployment from the cluster's view
        self.cloud_link = LinkEstimator(1e7, 0.04, forget=0.9)
        self.cloud_s_per_token = Ewma(0.2)
        self.cloud_retrieval_s = Ewma(0.2)
        self.decisions: deque[dict[str, Any]] = deque(maxlen=self.cfg.decisions_kept)
        self._pending: dict[str, dict[str, Any]] = {}  # request id -> its decision record, until it ends
        # Bytes an image took on the link lately (after the device's task-oriented encoding): a camera photo
        # crosses as its resized tiles, tens of times smaller; the raw size bounds it.
        self.image_sent_bytes = Ewma(0.3)
        # Per path: (measured / predicted - 1) of TTFT and TPOT for the last requests that ended.
        self.errors: dict[str, deque[tuple[float, float | None]]] = {}
        self.decision_counts: dict[str, int] = {}
        # After a restart, until each tier's replicas report again: the capacities saved before it.
        self._assumed: dict[str, TierLoad] = {}
        self._assumed_until = 0.0

    # -- reports --------------------------------------------------------------------------------
    def report_generation(self, report: GenerationReport) -> None:
        # A calibration or an on-device run measured no link.
        if report.link_samples or report.probe_pairs or report.link_outages:
            link = self.links.setdefault(
                report.link_id, LinkEstimator(self.cfg.prior_bandwidth_bps, self.cfg.prior_rtt_s, forget=0.9)
            )
            for nbytes, seconds in report.link_samples:
                link.observe(nbytes, seconds)
            for small, big in report.probe_pairs:
                link.observe_pair(small, big)
            # Last: a missed deadline is what ends a request's use of the link, so it follows the
            # request's round trips, and the estimate stays down until a later report shows recovery.
            for nbytes, waited_s in report.link_outages:
                link.observe_outage(waited_s, nbytes)
        for nbytes, seconds in report.cloud_link_samples:
            self.cloud_link.observe(nbytes, seconds)
        if report.drafted:
            self.accepted = 0.9 * self.accepted + report.accepted
            self.rejected = 0.9 * self.rejected + report.rejections
        if report.draft_tokens:
            self.draft_s.update(report.draft_s / report.draft_tokens)
        if report.path == "calibration" and report.on_device_s_per_token is not None:
            # A calibration is a deliberate measurement on an idle drafter: it replaces whatever came before
            # (a contended start-up timing would otherwise linger for many requests).
            self.draft_s.value = self.on_device_s.value = report.on_device_s_per_token
        elif report.on_device_s_per_token is not None:
            self.on_device_s.update(report.on_device_s_per_token)
        for tokens, seconds in report.prefill_samples:
            self.device_prefill.replace(float(tokens), seconds)

    def report_load(self, report: LoadReport) -> None:
        """A replica's load and its recent (tokens fed, seconds) forwards, measured where they ran."""
        tier = report.tier
        self.loads.setdefault(tier, {})[report.replica] = (
            time.monotonic(), TierLoad(True, report.ongoing, report.queued, report.capacity))
        self.load_nodes[report.replica] = report.node_id
        if tier == "edge":
            for fed, seconds in report.calibration_samples:
                self.verify_cost.replace(float(fed), seconds)
        for fed, seconds in report.service_samples:
            if tier == "edge":
                self.verify_cost.observe(float(fed), seconds)
            elif tier == "cloud" and fed > 0:  # (tokens generated, seconds) of a beam search
                self.cloud_s_per_token.update(seconds / fed)
            elif tier == "cloud":  # (0, seconds) of a retrieval
                self.cloud_retrieval_s.update(seconds)

    def _stale_s(self) -> float:
        return max(LOAD_STALE_PERIODS * self.cfg.load_report_period_s, LOAD_STALE_MIN_S)

    def tier_load(self, tier: str, assume_saved: bool = False) -> TierLoad:
        """The tier's measured load. ``assume_saved`` (decisions only): a router restarted from saved state
        takes the tier as it was saved until its replicas report again, at most one staleness window;
        otherwise every request in the seconds after a restart would be refused as if the edge were down.
        Readiness and the device's edge check keep the measured view."""
        now = time.monotonic()
        # A worker whose node died can live on and keep reporting; its replica serves nobody.
        fresh = [load for replica, (at, load) in self.loads.get(tier, {}).items()
                 if now - at < self._stale_s() and self.load_nodes.get(replica, "") not in self.dead_nodes]
        in_flight, queue_limit = self.in_flight_count(tier), self.queue_limits.get(tier, 0)
        if not fresh:
            if assume_saved and tier in self._assumed and now < self._assumed_until and not self.loads.get(tier):
                return replace(self._assumed[tier], in_flight=in_flight, queue_limit=queue_limit)
            return TierLoad(available=False, capacity=0)
        return TierLoad(True, sum(x.ongoing for x in fresh), sum(x.queued for x in fresh),
                        sum(x.capacity for x in fresh), in_flight, queue_limit, self.drain_rps(tier))

    def drain_rps(self, tier: str) -> float | None:
        """Requests the tier completed per second while saturated, lately; None until a few were seen."""
        since = time.monotonic() - DRAIN_WINDOW_S
        gaps = [gap for at, gap in self._drain_gaps.get(tier, ()) if at >= since]
        if len(gaps) < DRAIN_MIN_GAPS:
            return None
        return len(gaps) / max(sum(gaps), 1e-6)

    def _completed(self, request_id: str) -> None:
        """A request admitted to a tier completed there: it leaves the router's count, and, when every slot
        was taken, the gap since the last completion measures the tier's pace."""
        entry = self.in_flight.get(request_id)
        if entry is None:
            return
        busy = {tier: self.in_flight_count(tier) >= max(self.tier_load(tier).capacity, 1) for tier in entry[0]}
        del self.in_flight[request_id]
        now = time.monotonic()
        for tier, saturated in busy.items():
            last = self._last_busy_end.get(tier)
            if saturated and last is not None:
                self._drain_gaps.setdefault(tier, deque(maxlen=DRAIN_GAPS_KEPT)).append((now, now - last))
            self._last_busy_end[tier] = now if saturated else None

    def in_flight_count(self, tier: str) -> int:
        expired = time.monotonic() - self.request_deadline_s - 30.0
        for request_id in [r for r, (_, at) in self.in_flight.items() if at < expired]:
            del self.in_flight[request_id]
        return sum(1 for tiers, _ in self.in_flight.values() if tier in tiers)

    def report_end(self, request_id: str) -> None:
        """The request ended without an outcome to compare (failed, refused by a tier, cut by its client)."""
        self.in_flight.pop(request_id, None)
        self._pending.pop(request_id, None)

    # -- decisions ------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return min(self.accepted / max(self.accepted + self.rejected, 1e-9), 0.999)

    def alpha_for(self, request_class: str) -> float:
        """The class's acceptance, its own counts shrunk toward the shared estimate (which alone, without a
        class or before the class's first requests)."""
        counts = self.class_acceptance.get(request_class) if request_class else None
        if not counts:
            return self.alpha
        accepted, rejected = counts
        shared = self.alpha * CLASS_PRIOR_ROUNDS
        return min((accepted + shared) / max(accepted + rejected + CLASS_PRIOR_ROUNDS, 1e-9), 0.999)

    def recent_tpot_s(self) -> dict[str, float]:
        since = time.monotonic() - TPOT_WINDOW_S
        out = {}
        for path, samples in self._tpots.items():
            recent = [tpot for at, tpot in samples if at >= since]
            if recent:
                out[path] = statistics.median(recent)
        return out

    def prompt_tokens(self, text_bytes: int, images: int = 0) -> int:
        """The tokens a prompt of ``text_bytes`` bytes and ``images`` images will take, as lately measured
        (a prior of 4 bytes a token and 256 tokens an image before any)."""
        return self.prompt_size.tokens(text_bytes, images)

    def inputs(self, link_id: str, prompt_bytes: int = 0, max_new_tokens: int = 64,
               client_timeout_s: float | None = None, client_timeout_first_byte: bool = False,
               request_class: str = "", prompt_tokens: int = 0) -> RouteInputs:
        est = self.links.get(link_id) or LinkEstimator(self.cfg.prior_bandwidth_bps, self.cfg.prior_rtt_s)
        link = est.estimate()
        cloud = self.cloud_link.estimate()
        # t_v(k) feeds k + 1 tokens; until the edge reports, the prior for every k.
        table = tuple(self.verify_cost.seconds(k + 1) or self.cfg.prior_verify_s
                      for k in range(self.cfg.max_draft_len + 1))
        compute = ComputeCosts(
            draft_s_per_token=self.draft_s.value or self.cfg.prior_draft_s_per_token,
            verify_base_s=table[0], verify_per_token_s=0.0, verify_table_s=table,
        )
        return RouteInputs(
            alpha=self.alpha_for(request_class), compute=compute, on_device_s_per_token=self.on_device_s.value or 0.0,
            link=LinkCosts(link.rtt_s, link.bandwidth_bps, link.bandwidth_bps),
            edge=self.tier_load("edge", assume_saved=True), cloud=self.tier_load("cloud", assume_saved=True),
            device=device if (device := self.tier_load("device")).available else None,
            max_draft_len=self.cfg.max_draft_len,
            fast_slo_s_per_token=self.cfg.fast_slo_s_per_token, shed_to_device=self.cfg.shed_to_device,
            prompt_bytes=prompt_bytes, max_new_tokens=max_new_tokens,
            edge_prefill_s=(self.verify_cost.seconds(prompt_tokens) or 0.0) if prompt_tokens else 0.0,
            device_prefill_s=(self.device_prefill.seconds(prompt_tokens) or 0.0) if prompt_tokens else 0.0,
            cloud_link=LinkCosts(cloud.rtt_s, cloud.bandwidth_bps, cloud.bandwidth_bps),
            cloud_retrieval_s=self.cloud_retrieval_s.value or 0.05,
            cloud_s_per_token=self.cloud_s_per_token.value or self.cfg.prior_verify_s,
            request_deadline_s=self.request_deadline_s, client_timeout_s=client_timeout_s,
            client_timeout_first_byte=client_timeout_first_byte, measured_tpot_s=self.recent_tpot_s(),
            shared_host=self.shared_host,
        )

    def upload_bytes(self, req: RouteRequest) -> int:
        """What the request's input should take on the link: its text, and each image at what images took
        lately, never more than its raw size (the device never sends more: ``auto`` picks the smaller)."""
        sent = self.image_sent_bytes.value
        return req.prompt_bytes + sum(raw if sent is None else min(raw, int(sent)) for raw in req.image_bytes)

    def decide(self, req: RouteRequest) -> Decision:
        prompt_tokens = self.prompt_tokens(req.prompt_bytes, len(req.image_bytes))
        inputs = self.inputs(req.link_id, self.upload_bytes(req), req.max_new_tokens, req.client_timeout_s,
                             req.client_timeout_first_byte, req.request_class, prompt_tokens)
        decision = decide(req.path, req.quality, inputs, req.draft_len, req.needs_logprobs)
        decision.request_id = req.request_id
        prompt_bytes, max_new_tokens = inputs.prompt_bytes, req.max_new_tokens
        record = {
            "request_id": req.request_id, "at": time.time(), "link_id": req.link_id, "requested_path": req.path,
            "quality": req.quality, "request_class": req.request_class, "path": decision.path,
            "text_bytes": req.prompt_bytes, "images": len(req.image_bytes),
            "draft_len": decision.draft_len,
            "reason": decision.reason, "predicted_tpot_s": decision.predicted_tpot_s,
            "predicted_ttft_s": decision.predicted_ttft_s,
            "predicted_s_per_token": decision.predicted_s_per_token,
            "inputs": {
                "alpha": inputs.alpha, "rtt_s": inputs.link.rtt_s, "bandwidth_bps": inputs.link.bandwidth_up_bps,
                "draft_s_per_token": inputs.compute.draft_s_per_token,
                "verify_s": inputs.compute.verify_s(0), "verify_s_at_draft_len": inputs.compute.verify_s(
                    decision.draft_len), "edge": asdict(inputs.edge), "cloud": asdict(inputs.cloud),
                "prompt_bytes": prompt_bytes, "max_new_tokens": max_new_tokens,
                "prompt_tokens": prompt_tokens, "edge_prefill_s": inputs.edge_prefill_s,
                "device_prefill_s": inputs.device_prefill_s,
            },
        }
        self.decisions.append(record)
        if decision.path is not None:
            if req.request_id:
                self.in_flight[req.request_id] = (PATH_TIERS[decision.path], time.monotonic())
            self._pending[req.request_id] = record
            while len(self._pending) > MAX_PENDING_OUTCOMES:  # requests that never reported (failed, cut)
                del self._pending[next(iter(self._pending))]
        key = str(decision.path)
        self.decision_counts[key] = self.decision_counts.get(key, 0) + 1
        return decision

    def report_outcome(self, request_id: str, path: str, ttft_s: float, tpot_s: float, num_tokens: int,
                       image_bytes_sent: tuple[int, ...] = (), accepted: int = 0, rejections: int = 0,
                       prompt_tokens: int = 0) -> None:
        """What a request measured, beside what its decision predicted (recorded on the decision, and as the
        path's recent prediction errors). A request served on another path than decided (a fall-back) is
        compared with that path's prediction. ``image_bytes_sent``: per image, what crossed the link.
        ``accepted``, ``rejections``: its drafted tokens the verifier accepted, and its rounds that rejected
        one, learned for the request's class. ``prompt_tokens``: what its prompt took, to learn tokens per
        byte of text and per image."""
        for sent in image_bytes_sent:
            if sent > 0:
                self.image_sent_bytes.update(float(sent))
        self._completed(request_id)
        if num_tokens > 1 and tpot_s > 0:
            self._tpots.setdefault(path, deque(maxlen=TPOTS_KEPT)).append((time.monotonic(), tpot_s))
        record = self._pending.pop(request_id, None)
        if record is not None and record.get("request_class") and (accepted or rejections):
            counts = self.class_acceptance.setdefault(record["request_class"], [0.0, 0.0])
            counts[0], counts[1] = 0.9 * counts[0] + accepted, 0.9 * counts[1] + rejections
        if record is not None and prompt_tokens > 0:
            self.prompt_size.observe(int(record.get("text_bytes") or 0), int(record.get("images") or 0),
                                     prompt_tokens)
            if path == "on-device" and ttft_s > 0 and not record.get("images"):
                # An on-device request's first token is the drafter's prefill of its prompt, measured under
                # real traffic: the curve learns from it as from a calibration, so a start-up timing taken
                # while every tier loaded does not price the device for as long as traffic allows no re-timing.
                self.device_prefill.observe(float(prompt_tokens), ttft_s)
        if record is None or ttft_s <= 0:
            return
        predicted_ttft = record["predicted_ttft_s"].get(path)
        predicted_tpot = record["predicted_tpot_s"].get(path)
        if not predicted_ttft:
            return
        ttft_error = ttft_s / predicted_ttft - 1.0
        # One token has no TPOT; beam search answers all at once (predicted TPOT 0).
        tpot_error = tpot_s / predicted_tpot - 1.0 if num_tokens > 1 and predicted_tpot and tpot_s > 0 else None
        record["measured"] = {"path": path, "ttft_s": ttft_s, "tpot_s": tpot_s, "num_tokens": num_tokens,
                              "ttft_error": round(ttft_error, 4),
                              "tpot_error": None if tpot_error is None else round(tpot_error, 4)}
        self.errors.setdefault(path, deque(maxlen=ERRORS_KEPT)).append((ttft_error, tpot_error))

    def prediction_errors(self) -> dict[str, dict[str, float | int | None]]:
        """Per path, the median of (measured / predicted - 1) over the last requests: 0 is a perfect
        prediction, +0.5 a request 1.5x slower than predicted."""
        out: dict[str, dict[str, float | int | None]] = {}
        for path, errors in self.errors.items():
            tpots = [t for _, t in errors if t is not None]
            out[path] = {"requests": len(errors),
                         "ttft_error_median": round(statistics.median(e for e, _ in errors), 4),
                         "tpot_error_median": round(statistics.median(tpots), 4) if tpots else None}
        return out

    def snapshot(self) -> dict[str, Any]:
        links = {lid: asdict(est.estimate()) for lid, est in self.links.items()}
        links["edge-cloud"] = asdict(self.cloud_link.estimate())
        return {
            "links": links,
            "alpha": self.alpha,
            "alpha_by_class": {c: round(self.alpha_for(c), 4) for c in sorted(self.class_acceptance)},
            "draft_s_per_token": self.draft_s.value, "on_device_s_per_token": self.on_device_s.value,
            "verify_s": self.inputs("").compute.verify_s(0),
            # (tokens fed, seconds) of the edge's forwards: the curve every verify-cost prediction reads.
            "verify_curve": [[round(x, 2), round(y, 6)] for x, y in self.verify_cost.points()],
            # (prompt tokens, seconds to the first token) of the drafter: the device's prefill in TTFT.
            "device_prefill_curve": [[round(x, 2), round(y, 6)] for x, y in self.device_prefill.points()],
            "prompt_tokens": self.prompt_size.snapshot(),
            "cloud_s_per_token": self.cloud_s_per_token.value, "cloud_retrieval_s": self.cloud_retrieval_s.value,
            "loads": {tier: asdict(self.tier_load(tier)) for tier in self.loads},
            "decision_counts": dict(self.decision_counts),
            "shared_host": self.shared_host,
            "prediction_error": self.prediction_errors(),
            "recent_decisions": list(self.decisions)[-20:],
        }
