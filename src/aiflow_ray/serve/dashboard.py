"""The Grafana dashboard shipped with the KubeRay install (k8s/base/grafana/aiflow-dashboard.json, a ConfigMap
that Grafana's dashboard sidecar loads by its ``grafana_dashboard`` label): requests, the tiers' slots and
queues, speculative decoding, the router's decisions and prediction errors, and the links. Every query
names metrics from ``aiflow_ray.api.metrics``; tests/unit/test_metrics.py checks that each one is exported.
"""

from __future__ import annotations

from typing import Any

UID = "aiflow-ray"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# (row title, [(panel title, unit, [(legend, PromQL)])])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Requests", [
        ("Requests per second by path and status", "reqps",
         [("{{path}} {{status}}", "sum by (path, status) (rate(aiflow:requests_total[1m]))")]),
        ("Time to first token, p50 and p95", "s",
         [("p50 {{path}}", "histogram_quantile(0.5, sum by (le, path) "
                           "(rate(aiflow:time_to_first_token_seconds_bucket[5m])))"),
          ("p95 {{path}}", "histogram_quantile(0.95, sum by (le, path) "
                           "(rate(aiflow:time_to_first_token_seconds_bucket[5m])))")]),
        ("Time per output token p50, inter-token latency p95", "s",
         [("TPOT p50 {{path}}", "histogram_quantile(0.5, sum by (le, path) "
                                "(rate(aiflow:request_time_per_output_token_seconds_bucket[5m])))"),
          ("ITL p95 {{path}}", "histogram_quantile(0.95, sum by (le, path) "
                               "(rate(aiflow:inter_token_latency_seconds_bucket[5m])))")]),
        ("Output tokens per second", "short",
         [("{{path}}", "sum by (path) (rate(aiflow:generation_tokens_total[1m]))")]),
    ]),
    ("Tiers", [
        ("Requests holding a slot", "short", [("{{tier}}", "aiflow:num_requests_running")]),
        ("Requests waiting in the tier's queue", "short", [("{{tier}}", "aiflow:num_requests_waiting")]),
        ("Fail-overs, context resends, device fall-backs per second", "short",
         [("fail-overs", "rate(aiflow:failovers_total[5m])"),
          ("context resends", "rate(aiflow:context_resends_total[5m])"),
          ("device fall-backs", "rate(aiflow:device_fallbacks_total[5m])")]),
    ]),
    ("Speculative decoding", [
        ("Draft acceptance", "percentunit",
         [("measured", "sum(rate(aiflow:spec_decode_num_accepted_tokens_total[5m])) / "
                       "sum(rate(aiflow:spec_decode_num_draft_tokens_total[5m]))"),
          ("router's estimate (per position)", "aiflow:router_acceptance_rate")]),
        ("Mean draft length", "short",
         [("tokens per draft", "sum(rate(aiflow:spec_decode_num_draft_tokens_total[5m])) / "
                               "sum(rate(aiflow:spec_decode_num_drafts_total[5m]))")]),
    ]),
    ("Router", [
        ("Decisions per second by path", "reqps",
         [("{{path}}", "sum by (path) (rate(aiflow:router_decisions_total[5m]))")]),
        ("Prediction error (measured / predicted - 1, median)", "percentunit",
         [("{{path}} {{metric}}", "aiflow:router_prediction_error")]),
    ]),
    ("Links", [
        ("Bandwidth estimate per link", "Bps", [("{{link}}", "aiflow:link_bandwidth_bytes_per_second")]),
        ("Round-trip estimate per link", "s", [("{{link}}", "aiflow:link_rtt_seconds")]),
        ("Bytes per second on the device-edge link", "Bps",
         [("{{direction}}", "sum by (direction) (rate(aiflow:link_bytes_total[1m]))")]),
        ("Image bytes: as sent by clients and across the link", "Bps",
         [("{{kind}}", "sum by (kind) (rate(aiflow:image_bytes_total[5m]))")]),
    ]),
]


def grafana_dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id += 1
        y += 1
        width = 24 // min(len(row_panels), 4)
        for index, (title, unit, queries) in enumerate(row_panels):
            panels.append({
                "id": next_id, "type": "timeseries", "title": title, "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": width, "x": (index % 4) * width, "y": y + 8 * (index // 4)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                            "tooltip": {"mode": "multi"}},
                "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                             "legendFormat": legend} for i, (legend, expr) in enumerate(queries)],
            })
            next_id += 1
        y += 8 * ((len(row_panels) + 3) // 4)
    return {
        "uid": UID, "title": "aiflow-ray", "tags": ["aiflow", "ray-serve"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}, "hide": 0}]},
        "panels": panels,
    }


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
