"""The API's Prometheus metrics (api/metrics.py) and the Grafana dashboard shipped with the KubeRay install
(serve/dashboard.py): every panel asks for metrics the API exports, under vLLM's names where they mean the
same thing, and the router's view turns into the tiers' running and waiting gauges."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from aiflow_ray.api import metrics
from aiflow_ray.serve import kube
from aiflow_ray.serve.dashboard import grafana_dashboard, queries
from aiflow_ray.tiers.trace import Trace

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _exported() -> set[str]:
    return {family.name for family in metrics.REGISTRY.collect()}


def _base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_dashboard_query_names_an_exported_metric() -> None:
    exported = _exported()
    named = {_base(m) for expr in queries(grafana_dashboard()) for m in re.findall(r"aiflow:[a-z_]+", expr)}
    assert named, "the dashboard asks for no aiflow metric"
    assert named <= exported, f"panels ask for metrics the API does not export: {sorted(named - exported)}"
    # Every row of the card's observability: tiers, router, links, speculative decoding.
    titles = {p["title"] for p in grafana_dashboard()["panels"] if p["type"] == "row"}
    assert {"Requests", "Tiers", "Speculative decoding", "Router", "Links"} <= titles
    for panel in grafana_dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_the_install_ships_the_dashboard_as_rendered() -> None:
    shipped = json.loads((ROOT / kube.DASHBOARD_FILE).read_text())
    assert shipped == grafana_dashboard()
    assert kube.DASHBOARD_CONFIGMAP["options"]["labels"] == {"grafana_dashboard": "1"}  # the sidecar's label


def test_vllm_names_where_the_meaning_is_the_same() -> None:
    exported = _exported()
    for name in ("num_requests_running", "num_requests_waiting", "time_to_first_token_seconds",
                 "request_time_per_output_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_success",
                 "prompt_tokens", "generation_tokens", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                 "spec_decode_num_accepted_tokens"):
        assert f"aiflow:{name}" in exported, name


def _value(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_trace_and_the_routers_view_become_metrics() -> None:
    before = _value("aiflow:spec_decode_num_accepted_tokens_total")
    drafts = _value("aiflow:spec_decode_num_drafts_total")
    itl = _value("aiflow:inter_token_latency_seconds_count", path="device-edge")
    itl_s = _value("aiflow:inter_token_latency_seconds_sum", path="device-edge")
    metrics.observe(Trace(path="device-edge", num_tokens=9, ttft_s=0.2, tpot_s=0.05, total_s=0.6,
                          draft_lens=[4, 4, 2], accepted=[4, 2, 1], bytes_up=60, bytes_down=90,
                          token_times_s=[0.2, 0.3, 0.3, 0.3, 0.3, 0.45, 0.45, 0.6, 0.6],
                          image_bytes_raw=1000, image_bytes_sent=100), prompt_tokens=30)
    # Inter-token latency: one observation per round that brought tokens (tokens of one round arrive together).
    assert _value("aiflow:inter_token_latency_seconds_count", path="device-edge") - itl == 3
    assert _value("aiflow:inter_token_latency_seconds_sum", path="device-edge") - itl_s == pytest.approx(0.4)
    assert _value("aiflow:spec_decode_num_accepted_tokens_total") - before == 7
    assert _value("aiflow:spec_decode_num_drafts_total") - drafts == 3
    assert _value("aiflow:time_to_first_token_seconds_count", path="device-edge") >= 1
    metrics.observe_router({
        "loads": {"edge": {"available": True, "ongoing": 2, "queued": 0, "capacity": 4, "in_flight": 7},
                  "cloud": {"available": True, "ongoing": 1, "queued": 0, "capacity": 2, "in_flight": 0}},
        "links": {"dev-1": {"bandwidth_bps": 5e5, "rtt_s": 0.02}}, "alpha": 0.8,
        "prediction_error": {"server-only": {"requests": 4, "ttft_error_median": 0.1, "tpot_error_median": -0.05}},
    })
    # The router's own count (7 admitted) beats the lagging reports (2): 4 slots held, 3 waiting.
    assert _value("aiflow:num_requests_running", tier="edge") == 4
    assert _value("aiflow:num_requests_waiting", tier="edge") == 3
    assert _value("aiflow:num_requests_waiting", tier="cloud") == 0
    assert _value("aiflow:link_bandwidth_bytes_per_second", link="dev-1") == 5e5
    assert _value("aiflow:router_prediction_error", path="server-only", metric="tpot") == -0.05
    assert b"aiflow:router_acceptance_rate 0.8" in generate_latest(metrics.REGISTRY)
