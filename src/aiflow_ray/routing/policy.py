"""Path choice (pure): which tiers serve a request, and with which draft length.

Quality levels:
- ``exact``: the large model's output is required: device-edge or server-only.
- ``fast``: the small model's output is acceptable. The large model's output is still preferred
  while its predicted TPOT meets the service objective ``fast_tpot_slo_s``; beyond that (slow
  link, loaded edge) the request takes whichever path is predicted faster, usually the device.
- ``grounded``: retrieval from the cloud is required: device-edge-cloud.
An explicit path is honoured unless it cannot meet the quality or its tier is down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

from aiflow_ray.network.wire import TOKENS_MESSAGE_SIZE, VERIFY_RESULT_SIZE, verify_request_size
from aiflow_ray.routing.cost_model import ComputeCosts, LinkCosts, best_draft_len

Path = Literal["on-device", "device-edge", "device-edge-cloud", "server-only"]
Quality = Literal["exact", "fast", "grounded"]


@dataclass(frozen=True)
class TierLoad:
    available: bool = True
    ongoing: int = 0
    queued: int = 0
    capacity: int = 8  # requests the tier serves at once (replicas x max ongoing)

    @property
    def saturated(self) -> bool:
        return not self.available or self.ongoing + self.queued >= self.capacity

    @property
    def utilisation(self) -> float:
        return (self.ongoing + self.queued) / max(self.capacity, 1)


@dataclass(frozen=True)
class RouteInputs:
    alpha: float
    compute: ComputeCosts
    link: LinkCosts
    edge: TierLoad
    cloud: TierLoad
    max_draft_len: int = 24
    fast_tpot_slo_s: float = 0.25
    shed_to_device: bool = True  # False: queue at the edge instead of answering from the device


@dataclass
class Decision:
    path: Path | None  # None: the request cannot be served now (the caller answers 503)
    draft_len: int
    reason: str
    predicted_tpot_s: dict[str, float] = field(default_factory=dict)


class RouteError(Exception):
    """The request asks for something no available tier can do."""


def _edge_factor(load: TierLoad) -> float:
    # Queueing inflates service time; an M/M/1-style 1/(1-rho) keeps it simple and monotone.
    rho = min(load.utilisation, 0.95)
    return 1.0 / (1.0 - rho)


def predict(inputs: RouteInputs) -> tuple[int, dict[str, float]]:
    compute = inputs.compute
    factor = _edge_factor(inputs.edge)
    loaded = ComputeCosts(compute.draft_s_per_token, compute.verify_base_s * factor,
                          compute.verify_per_token_s * factor, compute.round_overhead_s)
    k, spec = best_draft_len(inputs.alpha, loaded, inputs.link, verify_request_size, VERIFY_RESULT_SIZE,
                             inputs.max_draft_len)
    # Server-only streams one TOKENS message per token: on a very slow link their serialisation,
    # not the verifier, sets the pace.
    streamed = TOKENS_MESSAGE_SIZE / inputs.link.bandwidth_down_bps
    return k, {
        "on-device": compute.draft_s_per_token,
        "device-edge": spec,
        "server-only": max(loaded.verify_s(0), streamed),
    }


def decide(requested: str, quality: Quality, inputs: RouteInputs, fixed_draft_len: int | None = None) -> Decision:
    k, tpot = predict(inputs)
    if fixed_draft_len is not None:
        k = fixed_draft_len
    edge_ok = inputs.edge.available and not inputs.edge.saturated
    if quality == "grounded" or requested == "device-edge-cloud":
        if not inputs.cloud.available:
            return Decision(None, k, "cloud tier unavailable", tpot)
        return Decision("device-edge-cloud", k, "grounded answers need the cloud knowledge base", tpot)
    if requested == "on-device":
        if quality == "exact":
            raise RouteError("path on-device cannot give quality 'exact' (the large model's output)")
        return Decision("on-device", 0, "requested on-device", tpot)
    if requested in ("device-edge", "server-only"):
        if edge_ok:
            return Decision(cast(Path, requested), k, f"requested {requested}", tpot)
        if quality == "fast" and inputs.shed_to_device:
            return Decision("on-device", 0, f"edge {'saturated' if inputs.edge.available else 'unreachable'}: "
                            "falling back to on-device", tpot)
        return Decision(None, k, "edge unavailable or saturated", tpot)
    # auto
    large_path: Path = "device-edge" if tpot["device-edge"] <= tpot["server-only"] else "server-only"
    if quality == "exact":
        if not inputs.edge.available:
            return Decision(None, k, "edge unreachable; exact answers need the large model", tpot)
        if inputs.edge.saturated and inputs.shed_to_device:
            return Decision(None, k, "edge saturated; exact answers need the large model", tpot)
        return Decision(large_path, k, f"{large_path} has the lowest predicted TPOT "
                        f"({tpot[large_path] * 1e3:.1f} ms)", tpot)
    if not edge_ok:
        state = "saturated" if inputs.edge.available else "unreachable"
        if inputs.shed_to_device or not inputs.edge.available:
            return Decision("on-device", 0, f"edge {state}: on-device", tpot)
        return Decision(large_path, k, f"edge {state}: queueing for the large model", tpot)
    slo_ms = inputs.fast_tpot_slo_s * 1e3
    if tpot[large_path] <= inputs.fast_tpot_slo_s:
        return Decision(large_path, k, f"{large_path} predicted {tpot[large_path] * 1e3:.1f} ms/token meets the "
                        f"{slo_ms:g} ms objective", tpot)
    if tpot["on-device"] < tpot[large_path]:
        return Decision("on-device", 0, f"{large_path} predicted {tpot[large_path] * 1e3:.1f} ms/token misses the "
                        f"{slo_ms:g} ms objective; on-device is faster ({tpot['on-device'] * 1e3:.1f} ms)", tpot)
    return Decision(large_path, k, f"{large_path} predicted {tpot[large_path] * 1e3:.1f} ms/token, the fastest "
                    "path though over the objective", tpot)
