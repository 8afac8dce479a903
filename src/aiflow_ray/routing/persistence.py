"""The router's state in the cluster's key-value store (GCS): it outlives any replica, so a restarted router,
or the ingress while no router answers, starts from the last saved estimates and emulated links.

JSON written and read here only; nothing a client sends is stored as anything but numbers.
"""

from __future__ import annotations

import json
from typing import Any

from aiflow_ray.config import AppArgs, LinkConfig
from aiflow_ray.logging_utils import get_logger

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
