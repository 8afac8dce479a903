"""Prometheus metrics recorded by the ingress from each request's trace."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("aiflow_requests", "Requests by path and outcome", ["path", "status"], registry=REGISTRY)
TTFT = Histogram("aiflow_ttft_seconds", "Time to first token", ["path"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TPOT = Histogram("aiflow_tpot_seconds", "Time per output token after the first", ["path"],
                 buckets=_LATENCY_BUCKETS, registry=REGISTRY)
DRAFT_TOKENS = Counter("aiflow_draft_tokens", "Draft tokens proposed", registry=REGISTRY)
ACCEPTED_TOKENS = Counter("aiflow_accepted_tokens", "Draft tokens accepted", registry=REGISTRY)
OUTPUT_TOKENS = Counter("aiflow_output_tokens", "Tokens returned", ["path"], registry=REGISTRY)
LINK_BYTES = Counter("aiflow_link_bytes", "Bytes moved per link and direction", ["link", "direction"],
                     registry=REGISTRY)
DECISIONS = Counter("aiflow_router_decisions", "Router decisions by chosen path", ["path"], registry=REGISTRY)
FAILOVERS = Counter("aiflow_failovers", "Edge calls retried on another replica after a failure or a missed "
                    "deadline", registry=REGISTRY)
CONTEXT_RESENDS = Counter("aiflow_context_resends", "Rounds that resent the context (the edge lacked the session)",
                          registry=REGISTRY)
ROUNDS = Counter("aiflow_rounds", "Speculative rounds", registry=REGISTRY)
FALLBACKS = Counter("aiflow_device_fallbacks", "Generations the device finished alone after losing the edge",
                    registry=REGISTRY)


def observe(trace: dict[str, Any]) -> None:
    path = trace.get("path", "unknown")
    if trace.get("num_tokens"):
        TTFT.labels(path).observe(trace.get("ttft_s", 0.0))
        OUTPUT_TOKENS.labels(path).inc(trace["num_tokens"])
    if trace.get("num_tokens", 0) > 1 and trace.get("tpot_s"):
        TPOT.labels(path).observe(trace["tpot_s"])
    DRAFT_TOKENS.inc(sum(trace.get("draft_lens", [])))
    ACCEPTED_TOKENS.inc(sum(trace.get("accepted", [])))
    LINK_BYTES.labels("device-edge", "up").inc(trace.get("bytes_up", 0))
    LINK_BYTES.labels("device-edge", "down").inc(trace.get("bytes_down", 0))
    FAILOVERS.inc(trace.get("failovers", 0))
    CONTEXT_RESENDS.inc(trace.get("context_resends", 0))
    if trace.get("path") != "server-only":
        ROUNDS.inc(trace.get("rounds", 0))
    if trace.get("fallback"):
        FALLBACKS.inc()
