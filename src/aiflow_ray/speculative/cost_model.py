"""The serial speculative cost model (pure functions; no state, no I/O).

Per round with draft length k:
    T(k) = k * t_d + RTT + S_up(k) / B_up + t_v(k) + S_down / B_down + overhead
Expected output tokens per round with per-position acceptance alpha:
    E(k) = (1 - alpha^(k+1)) / (1 - alpha)
or, with position-dependent acceptance a_1, a_2, ... (a_i = P(d_i accepted | d_1..d_{i-1} accepted)):
    E(k) = 1 + sum_{j=1..k} prod_{i<=j} a_i
Real acceptance is bursty (predictable stretches of code are accepted whole), so a_i grows with i
and the constant-alpha model undervalues longer drafts; the adaptive policy uses the positional form.
TPOT(k) = T(k) / E(k). Server-only TPOT = t_v(1): tokens stream down the link, so the one-way
latency lands in TTFT, not in TPOT. k = 0 means "ask the verifier for one token per round".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkCosts:
    rtt_s: float
    bandwidth_up_bps: float  # bytes per second
    bandwidth_down_bps: float


@dataclass(frozen=True)
class ComputeCosts:
    draft_s_per_token: float  # t_d
    verify_base_s: float  # t_v(k) = verify_base_s + verify_per_token_s * (k + 1), unless verify_table_s has k
    verify_per_token_s: float
    round_overhead_s: float = 0.0  # per-round time not explained by draft, verify or link
    # t_v(k) for k = 0, 1, ...: a measured curve (network.estimators.ForwardCostCurve), non-decreasing and
    # non-negative; past its end the last step repeats.
    verify_table_s: tuple[float, ...] = ()

    def verify_s(self, k: int) -> float:
        table = self.verify_table_s
        if table:
            if k < len(table):
                return table[k]
            step = table[-1] - table[-2] if len(table) > 1 else 0.0
            return table[-1] + step * (k - len(table) + 1)
        return self.verify_base_s + self.verify_per_token_s * (k + 1)

    def scaled(self, factor: float, device_too: bool = False) -> ComputeCosts:
        """The verifier's costs times ``factor`` (a queue in front of it); the device's unchanged, unless the
        device computes on the same CPUs (``device_too``), where its drafting waits with the edge's queue."""
        return ComputeCosts(self.draft_s_per_token * (factor if device_too else 1.0), self.verify_base_s * factor,
                            self.verify_per_token_s * factor, self.round_overhead_s,
                            tuple(t * factor for t in self.verify_table_s))


Acceptance = float | Sequence[float]  # constant alpha, or a_1, a_2, ... (the last repeats)


def expected_tokens(k: int, alpha: Acceptance) -> float:
    """E(k): mean output tokens of a round with k draft tokens (accepted plus correction/bonus)."""
    if k < 0:
        raise ValueError("k must be >= 0")
    if not isinstance(alpha, float | int):
        if not alpha:
            raise ValueError("need at least one positional acceptance")
        total, survive = 1.0, 1.0
        for i in range(k):
            survive *= alpha[min(i, len(alpha) - 1)]
            total += survive
        return total
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def round_time_s(
    k: int, compute: ComputeCosts, link: LinkCosts, up_bytes: Callable[[int], int], down_bytes: int
) -> float:
    return (
        k * compute.draft_s_per_token
        + link.rtt_s
        + up_bytes(k) / link.bandwidth_up_bps
        + compute.verify_s(k)
        + down_bytes / link.bandwidth_down_bps
        + compute.round_overhead_s
    )


def speculative_tpot_s(
    k: int, alpha: Acceptance, compute: ComputeCosts, link: LinkCosts, up_bytes: Callable[[int], int], down_bytes: int
) -> float:
    return round_time_s(k, compute, link, up_bytes, down_bytes) / expected_tokens(k, alpha)


def server_only_tpot_s(compute: ComputeCosts) -> float:
    return compute.verify_s(0)


def best_draft_len(
    alpha: Acceptance,
    compute: ComputeCosts,
    link: LinkCosts,
    up_bytes: Callable[[int], int],
    down_bytes: int,
    max_k: int,
    min_k: int = 1,
) -> tuple[int, float]:
    """The k in [min_k, max_k] with the lowest predicted TPOT, and that TPOT."""
    best = min(
        range(min_k, max_k + 1),
        key=lambda k: speculative_tpot_s(k, alpha, compute, link, up_bytes, down_bytes),
    )
    return best, speculative_tpot_s(best, alpha, compute, link, up_bytes, down_bytes)
