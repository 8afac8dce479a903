"""Draft-length policies behind one interface, chosen by name from a registry.

The device loop asks ``next_draft_len(remaining, draft_top_k)`` before each round and reports each round back
through ``update(feedback)`` (the hook transformers calls ``update_candidate_strategy``). The adaptive
policy keeps its own measurements (acceptance, draft and verify compute, link RTT and bandwidth from
observed round trips) and picks the k that minimises the cost model's TPOT. It is never told the
emulated link's settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiflow_ray.config import DraftPolicyConfig
from aiflow_ray.network.estimators import Ewma, ForgettingLinearFit, LinkEstimator
from aiflow_ray.network.wire import VERIFY_RESULT_SIZE, verify_request_size
from aiflow_ray.speculative.cost_model import ComputeCosts, LinkCosts, best_draft_len


@dataclass(frozen=True)
class RoundFeedback:
    num_drafted: int
    num_accepted: int
    draft_s: float  # device compute for the draft
    verify_s: float  # edge compute, as the verifier reported it
    link_s: float  # round trip minus the verifier's compute: RTT plus serialisation
    bytes_up: int
    bytes_down: int
    other_s: float  # the rest of the round (device bookkeeping, encoding)
    prefill: bool  # the context crossed in this round: compute times include a prefill


class DraftLenPolicy(Protocol):
    def next_draft_len(self, remaining_tokens: int, draft_top_k: int = 0) -> int:
        """k for the next round; ``draft_top_k`` is the request's sparse draft distribution size (0 when
        greedy), which sets how many bytes each draft token costs on the uplink."""
        ...

    def update(self, feedback: RoundFeedback) -> None: ...

    def describe(self) -> dict[str, float]: ...


class FixedDraftLen:
    def __init__(self, cfg: DraftPolicyConfig) -> None:
        self.k = cfg.draft_len

    def next_draft_len(self, remaining_tokens: int, draft_top_k: int = 0) -> int:
        # The round always emits one token of its own (correction or bonus), so drafting more than
        # remaining - 1 tokens is wasted work.
        return max(0, min(self.k, remaining_tokens - 1))

    def update(self, feedback: RoundFeedback) -> None:
        return None

    def describe(self) -> dict[str, float]:
        return {"draft_len": float(self.k)}


class AcceptanceEstimator:
    """Pooled alpha = accepted / (accepted + rejected), and positional a_i, with fading counts.

    a_i = P(draft token i accepted | tokens 1..i-1 accepted) is estimated from the rounds that
    reached position i, shrunk toward the pooled alpha when few rounds did, so that positions the
    policy rarely drafts fall back to the pooled figure instead of noise.
    """

    def __init__(self, prior: float, prior_weight: float, forget: float = 0.95, max_positions: int = 64,
                 shrink_weight: float = 4.0) -> None:
        self.accepted = prior * prior_weight
        self.rejected = (1 - prior) * prior_weight
        self.forget = forget
        self.shrink_weight = shrink_weight
        self.reached = [0.0] * max_positions  # rounds whose draft reached position i with 0..i-1 accepted
        self.kept = [0.0] * max_positions  # of those, rounds that accepted position i

    def update(self, num_drafted: int, num_accepted: int) -> None:
        if num_drafted == 0:
            return
        f = self.forget
        self.accepted = f * self.accepted + num_accepted
        self.rejected = f * self.rejected + int(num_accepted < num_drafted)
        for i in range(len(self.reached)):
            self.reached[i] *= f
            self.kept[i] *= f
        for i in range(min(num_accepted + 1, num_drafted, len(self.reached))):
            self.reached[i] += 1.0
            if i < num_accepted:
                self.kept[i] += 1.0

    @property
    def alpha(self) -> float:
        total = self.accepted + self.rejected
        return min(self.accepted / total, 0.999) if total > 0 else 0.5

    def positional(self, upto: int) -> list[float]:
        pooled = self.alpha
        w = self.shrink_weight
        return [min((self.kept[i] + w * pooled) / (self.reached[i] + w), 0.999)
                for i in range(min(upto, len(self.reached)))]


class AdaptiveDraftLen:
    """Pick k maximising expected tokens per second under the measured cost model."""

    def __init__(self, cfg: DraftPolicyConfig) -> None:
        self.cfg = cfg
        self.acceptance = AcceptanceEstimator(
            cfg.prior_acceptance, cfg.prior_weight_tokens, forget=1.0 - 1.0 / cfg.acceptance_memory_rounds
        )
        self.draft_s_per_token = Ewma(0.2)
        # verify_s over tokens fed (k + 1); a weak prior of zero growth until several k were seen.
        self.verify_fit = ForgettingLinearFit(forget=0.95, prior_slope=0.0, prior_strength=4.0)
        self.other_s = Ewma(0.2, initial=0.0)
        self.link = LinkEstimator()
        self.last_k = min(cfg.draft_len, cfg.max_draft_len)


    def compute_costs(self) -> ComputeCosts | None:
        if self.draft_s_per_token.value is None or self.verify_fit.count_weight == 0:
            return None
        per_token = max(self.verify_fit.slope(), 0.0)
        base = self.verify_fit.intercept(per_token)
        return ComputeCosts(
            draft_s_per_token=self.draft_s_per_token.value,
            verify_base_s=base,
            verify_per_token_s=per_token,
            round_overhead_s=self.other_s.value or 0.0,
        )

    def next_draft_len(self, remaining_tokens: int, draft_top_k: int = 0) -> int:
        cap = max(0, min(self.cfg.max_draft_len, remaining_tokens - 1))
        if cap == 0:
            return 0
        compute = self.compute_costs()
        if compute is None:
            return min(self.last_k, cap)
        est = self.link.estimate()
        link = LinkCosts(est.rtt_s, est.bandwidth_bps, est.bandwidth_bps)
        k, _ = best_draft_len(
            self.acceptance.positional(self.cfg.max_draft_len), compute, link,
            lambda n: verify_request_size(n, draft_top_k), VERIFY_RESULT_SIZE,
            self.cfg.max_draft_len,
        )
        self.last_k = k
        return min(k, cap)

    def update(self, feedback: RoundFeedback) -> None:
        self.acceptance.update(feedback.num_drafted, feedback.num_accepted)
        self.link.observe(feedback.bytes_up + feedback.bytes_down, feedback.link_s)
        if feedback.prefill:
            return  # prefill compute says nothing about steady-state draft/verify cost
        if feedback.num_drafted > 0:
            self.draft_s_per_token.update(feedback.draft_s / feedback.num_drafted)
        self.verify_fit.observe(feedback.num_drafted + 1, feedback.verify_s)
        self.other_s.update(max(feedback.other_s, 0.0))

    def describe(self) -> dict[str, float]:
        est = self.link.estimate()
        compute = self.compute_costs()
        out = {
            "alpha": self.acceptance.alpha,
            "rtt_s": est.rtt_s,
            "bandwidth_bps": est.bandwidth_bps,
            "draft_len": float(self.last_k),
        }
        if compute is not None:
            out.update(
                draft_s_per_token=compute.draft_s_per_token,
                verify_base_s=compute.verify_base_s,
                verify_per_token_s=compute.verify_per_token_s,
            )
        return out


POLICIES: dict[str, Callable[[DraftPolicyConfig], DraftLenPolicy]] = {
    "fixed": FixedDraftLen,
    "adaptive": AdaptiveDraftLen,
}


def make_policy(cfg: DraftPolicyConfig) -> DraftLenPolicy:
    """The policy ``cfg.policy`` names (the config's Literal admits only registered names)."""
    return POLICIES[cfg.policy](cfg)
