"""The router's state in the cluster's key-value store (GCS): it outlives any replica, so a restarted router,
or the ingress while no router answers, starts from the last saved estimates and emulated links. The
estimates go out as plain numbers (``export_state``) and come back as a fresh router's priors
(``restore_state``).

JSON written and read here only; nothing a client sends is stored as anything but numbers.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiflow_ray.config import AppArgs, LinkConfig
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network.estimators import LinkEstimator
from aiflow_ray.routing.policy import TierLoad
from aiflow_ray.routing.router import RouterState

log = get_logger(__name__)

KV_NAMESPACE = "aiflow"


def state_key(app_name: str) -> bytes:
    return f"router-state/{app_name}".encode()


def load_saved_state(app_name: str) -> dict[str, Any] | None:
    """The router's last saved state (JSON written by this module), or None."""
    from ray.experimental import internal_kv

    try:
        raw = internal_kv._internal_kv_get(state_key(app_name), namespace=KV_NAMESPACE)
        return json.loads(raw) if raw else None
    except Exception as exc:  # a GCS hiccup or a record from another version: start from the priors
        log.warning("could not read the router's saved state: %s", type(exc).__name__)
        return None


def save_state(app_name: str, state: dict[str, Any]) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(state_key(app_name), json.dumps(state).encode(), overwrite=True,
                                 namespace=KV_NAMESPACE)


def emulated_links_of(args: AppArgs, saved: dict[str, Any] | None) -> dict[str, LinkConfig]:
    out = {}
    for link_id, cfg in ((saved or {}).get("emulated_links") or {}).items():
        out[str(link_id)] = args.link.model_copy(update={"bandwidth_bps": float(cfg["bandwidth_bps"]),
                                                         "rtt_s": float(cfg["rtt_s"])})
    return out


def export_state(router: RouterState) -> dict[str, Any]:
    """What a restarted router needs to decide as this one would: the estimates, as plain numbers (JSON).

    Estimators are saved as their current estimates, not their internals: a restored estimator starts
    from them as its priors, and its first measurements refine them.
    """
    cloud = router.cloud_link.estimate()
    return {
        "version": 1,
        # Without a slow spell: an outage under way must not become a restarted router's lasting prior.
        "links": {lid: [e.bandwidth_bps, e.rtt_s] for lid, est in router.links.items()
                  if (e := est.base_estimate())},
        "acceptance": [router.accepted, router.rejected],
        "class_acceptance": {c: list(counts) for c, counts in router.class_acceptance.items()},
        "draft_s_per_token": router.draft_s.value, "on_device_s_per_token": router.on_device_s.value,
        "verify_curve": router.verify_cost.export() or None,
        "device_prefill_curve": router.device_prefill.export() or None,
        "prompt_size": router.prompt_size.export(),
        "cloud_link": [cloud.bandwidth_bps, cloud.rtt_s],
        "cloud_s_per_token": router.cloud_s_per_token.value, "cloud_retrieval_s": router.cloud_retrieval_s.value,
        "decision_counts": dict(router.decision_counts),
        # Capacities only: a restarted router assumes the tiers idle, as the ingress does without a router.
        "tier_capacity": {tier: load.capacity for tier in router.loads
                          if (load := router.tier_load(tier, assume_saved=True)).available},
    }


def restore_state(router: RouterState, saved: dict[str, Any]) -> None:
    """Start from ``export_state()``'s numbers; anything missing or malformed keeps the router's priors."""
    if saved.get("version") != 1:
        return
    for link_id, (bandwidth_bps, rtt_s) in (saved.get("links") or {}).items():
        router.links[str(link_id)] = LinkEstimator(float(bandwidth_bps), float(rtt_s), forget=0.9)
    accepted, rejected = saved.get("acceptance") or (router.accepted, router.rejected)
    router.accepted, router.rejected = float(accepted), float(rejected)
    for request_class, counts in (saved.get("class_acceptance") or {}).items():
        router.class_acceptance[str(request_class)] = [float(counts[0]), float(counts[1])]
    router.draft_s.value = saved.get("draft_s_per_token") or router.draft_s.value
    router.on_device_s.value = saved.get("on_device_s_per_token") or router.on_device_s.value
    if saved.get("verify_curve"):
        router.verify_cost.restore(saved["verify_curve"])
    if saved.get("device_prefill_curve"):
        router.device_prefill.restore(saved["device_prefill_curve"])
    if isinstance(saved.get("prompt_size"), dict):
        router.prompt_size.restore(saved["prompt_size"])
    if saved.get("cloud_link"):
        bandwidth_bps, rtt_s = saved["cloud_link"]
        router.cloud_link = LinkEstimator(float(bandwidth_bps), float(rtt_s), forget=0.9)
    router.cloud_s_per_token.value = saved.get("cloud_s_per_token") or router.cloud_s_per_token.value
    router.cloud_retrieval_s.value = saved.get("cloud_retrieval_s") or router.cloud_retrieval_s.value
    router.decision_counts.update({str(k): int(v) for k, v in (saved.get("decision_counts") or {}).items()})
    capacity = saved.get("tier_capacity") or {}
    router._assumed = {str(tier): TierLoad(True, 0, 0, int(cap)) for tier, cap in capacity.items() if int(cap) > 0}
    router._assumed_until = time.monotonic() + router._stale_s()
