"""Prometheus metrics: recorded by the ingress from each request's trace, and refreshed from the router's view
of the tiers at each scrape.

Names follow vLLM's wherever they mean the same thing, under the ``aiflow:`` prefix where vLLM writes
``vllm:`` (``aiflow:time_to_first_token_seconds`` is ``vllm:time_to_first_token_seconds`` measured at this
API, the link included), so a dashboard or alert written for vLLM needs its prefix changed, nothing else.
What vLLM has no name for (paths, links, fail-overs, the router) is named in the same style.
``k8s/grafana/aiflow-dashboard.json`` charts them; tests/unit/test_metrics.py checks that every panel asks
for a metric this module exports.
"""

from __future__ import annotations

import itertools
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aiflow_ray.tiers.trace import Trace

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# -- as vLLM names them -----------------------------------------------------------------------------
NUM_RUNNING = Gauge("aiflow:num_requests_running", "Requests holding a slot of the tier now (the router's count "
                    "and the replicas' reports, whichever is higher, up to the tier's capacity)", ["tier"],
                    registry=REGISTRY)
NUM_WAITING = Gauge("aiflow:num_requests_waiting", "Requests admitted to the tier and waiting for a slot (its "
                    "bounded queue)", ["tier"], registry=REGISTRY)
REQUEST_SUCCESS = Counter("aiflow:request_success", "Requests answered in full", ["path"], registry=REGISTRY)
TTFT = Histogram("aiflow:time_to_first_token_seconds", "Time to first token, the link included", ["path"],
                 buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TPOT = Histogram("aiflow:request_time_per_output_token_seconds", "A request's mean time per output token after "
                 "the first", ["path"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
ITL = Histogram("aiflow:inter_token_latency_seconds", "Time between a request's successive outputs: one "
                "observation per round that brought tokens (a speculative round's accepted tokens arrive together, "
                "as a vLLM step's do)", ["path"],
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5,
                         10), registry=REGISTRY)
E2E = Histogram("aiflow:e2e_request_latency_seconds", "A request's whole generation", ["path"],
                buckets=_LATENCY_BUCKETS, registry=REGISTRY)
PROMPT_TOKENS = Counter("aiflow:prompt_tokens", "Prompt tokens, image tokens included", registry=REGISTRY)
GENERATION_TOKENS = Counter("aiflow:generation_tokens", "Tokens returned", ["path"], registry=REGISTRY)
SPEC_DRAFTS = Counter("aiflow:spec_decode_num_drafts", "Drafts verified (speculative rounds)", registry=REGISTRY)
SPEC_DRAFT_TOKENS = Counter("aiflow:spec_decode_num_draft_tokens", "Draft tokens proposed", registry=REGISTRY)
SPEC_ACCEPTED_TOKENS = Counter("aiflow:spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=REGISTRY)

# -- this system's own -------------------------------------------------------------------------------
REQUESTS = Counter("aiflow:requests", "Requests by path and HTTP status", ["path", "status"], registry=REGISTRY)
DECISIONS = Counter("aiflow:router_decisions", "Router decisions by chosen path", ["path"], registry=REGISTRY)
PREDICTION_ERROR = Gauge("aiflow:router_prediction_error", "Median of measured / predicted - 1 over the path's "
                         "last requests (0: exact; 0.5: 1.5x slower than predicted)", ["path", "metric"],
                         registry=REGISTRY)
LINK_BANDWIDTH = Gauge("aiflow:link_bandwidth_bytes_per_second", "The router's bandwidth estimate per link",
                       ["link"], registry=REGISTRY)
LINK_RTT = Gauge("aiflow:link_rtt_seconds", "The router's round-trip estimate per link", ["link"], registry=REGISTRY)
ACCEPTANCE = Gauge("aiflow:router_acceptance_rate", "The router's per-position draft acceptance estimate",
                   registry=REGISTRY)
LINK_BYTES = Counter("aiflow:link_bytes", "Bytes moved per link and direction", ["link", "direction"],
                     registry=REGISTRY)
FAILOVERS = Counter("aiflow:failovers", "Edge calls retried on another replica after a failure or a missed "
                    "deadline", registry=REGISTRY)
CONTEXT_RESENDS = Counter("aiflow:context_resends", "Rounds that resent the context (the edge lacked the session)",
                          registry=REGISTRY)
FALLBACKS = Counter("aiflow:device_fallbacks", "Generations the device finished alone after losing the edge",
                    registry=REGISTRY)
IMAGE_BYTES = Counter("aiflow:image_bytes", "Image bytes as the client sent them (raw) and as they crossed the "
                      "link (sent)", ["kind"], registry=REGISTRY)


def observe(trace: Trace, prompt_tokens: int = 0) -> None:
    """One answered request's trace."""
    path = trace.path or "unknown"
    REQUEST_SUCCESS.labels(path).inc()
    PROMPT_TOKENS.inc(max(prompt_tokens, 0))
    if trace.num_tokens:
        TTFT.labels(path).observe(trace.ttft_s)
        GENERATION_TOKENS.labels(path).inc(trace.num_tokens)
    if trace.num_tokens > 1 and trace.tpot_s:
        TPOT.labels(path).observe(trace.tpot_s)
    arrivals = sorted(set(trace.token_times_s))
    for earlier, later in itertools.pairwise(arrivals):
        ITL.labels(path).observe(later - earlier)
    if trace.total_s:
        E2E.labels(path).observe(trace.total_s)
    if path != "server-only":
        SPEC_DRAFTS.inc(sum(1 for k in trace.draft_lens if k > 0))
    SPEC_DRAFT_TOKENS.inc(sum(trace.draft_lens))
    SPEC_ACCEPTED_TOKENS.inc(sum(trace.accepted))
    LINK_BYTES.labels("device-edge", "up").inc(trace.bytes_up)
    LINK_BYTES.labels("device-edge", "down").inc(trace.bytes_down)
    FAILOVERS.inc(trace.failovers)
    CONTEXT_RESENDS.inc(trace.context_resends)
    IMAGE_BYTES.labels("raw").inc(trace.image_bytes_raw)
    IMAGE_BYTES.labels("sent").inc(trace.image_bytes_sent)
    if trace.fallback:
        FALLBACKS.inc()


def observe_router(snapshot: dict[str, Any]) -> None:
    """The router's view (GET /v1/router's body), set at each scrape: tier queues, links, prediction errors."""
    for tier, load in (snapshot.get("loads") or {}).items():
        capacity = int(load.get("capacity") or 0)
        held = max(int(load.get("ongoing", 0)) + int(load.get("queued", 0)), int(load.get("in_flight", 0)))
        NUM_RUNNING.labels(tier).set(min(held, capacity))
        NUM_WAITING.labels(tier).set(max(held - capacity, 0))
    for link, est in (snapshot.get("links") or {}).items():
        LINK_BANDWIDTH.labels(link).set(float(est.get("bandwidth_bps") or 0.0))
        LINK_RTT.labels(link).set(float(est.get("rtt_s") or 0.0))
    if snapshot.get("alpha") is not None:
        ACCEPTANCE.set(float(snapshot["alpha"]))
    for path, errors in (snapshot.get("prediction_error") or {}).items():
        for metric in ("ttft", "tpot"):
            value = errors.get(f"{metric}_error_median")
            if value is not None:
                PREDICTION_ERROR.labels(path, metric).set(float(value))
