from __future__ import annotations

import pytest

from aiflow_ray.config import DraftPolicyConfig
from aiflow_ray.network.wire import VERIFY_RESULT_SIZE, verify_request_size
from aiflow_ray.speculative.cost_model import (
    ComputeCosts,
    LinkCosts,
    best_draft_len,
    expected_tokens,
    server_only_tpot_s,
    speculative_tpot_s,
)
from aiflow_ray.speculative.policy import AdaptiveDraftLen, FixedDraftLen, RoundFeedback, make_policy

CPU_PAIR = ComputeCosts(draft_s_per_token=0.09, verify_base_s=0.233, verify_per_token_s=0.0)


def test_expected_tokens() -> None:
    assert expected_tokens(0, 0.8) == pytest.approx(1.0)
    assert expected_tokens(1, 0.5) == pytest.approx(1.5)
    assert expected_tokens(4, 0.8) == pytest.approx((1 - 0.8**5) / 0.2)
    assert expected_tokens(3, 1.0) == 4.0


def test_cost_model_reproduces_the_serial_bound() -> None:
    """alpha 0.83 and draft/verify cost 0.39 give about 0.70x server-only TPOT at best."""
    link = LinkCosts(0.0, 1e9, 1e9)
    k, tpot = best_draft_len(0.83, CPU_PAIR, link, lambda n: 0, 0, max_k=24)
    assert k in (2, 3)
    assert tpot / server_only_tpot_s(CPU_PAIR) == pytest.approx(0.70, abs=0.01)
    # Long drafts stop paying: at k=24 speculation is slower than the server alone.
    assert speculative_tpot_s(24, 0.83, CPU_PAIR, link, lambda n: 0, 0) > server_only_tpot_s(CPU_PAIR)


def test_higher_rtt_favours_longer_drafts_and_low_acceptance_shorter() -> None:
    up = verify_request_size
    fast = best_draft_len(0.8, CPU_PAIR, LinkCosts(0.001, 1e6, 1e6), up, VERIFY_RESULT_SIZE, 24)[0]
    slow = best_draft_len(0.8, CPU_PAIR, LinkCosts(0.5, 1e6, 1e6), up, VERIFY_RESULT_SIZE, 24)[0]
    assert slow > fast
    poor = best_draft_len(0.3, CPU_PAIR, LinkCosts(0.001, 1e6, 1e6), up, VERIFY_RESULT_SIZE, 24)[0]
    assert poor <= fast


def test_fixed_policy_caps_at_remaining_tokens() -> None:
    policy = FixedDraftLen(DraftPolicyConfig(policy="fixed", draft_len=8))  # type: ignore[call-arg]
    assert policy.next_draft_len(100) == 8
    assert policy.next_draft_len(3) == 2
    assert policy.next_draft_len(1) == 0


def _feed(policy: AdaptiveDraftLen, rounds: int, alpha: float, rtt_s: float, seed: int = 0) -> list[int]:
    """Closed loop: the policy picks k, a drafter with i.i.d. acceptance alpha answers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chosen = []
    for _ in range(rounds):
        k = policy.next_draft_len(1000)
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        chosen.append(k)
        policy.update(RoundFeedback(
            num_drafted=k, num_accepted=accepted, draft_s=0.09 * k, verify_s=0.233 + 0.002 * k, link_s=rtt_s,
            bytes_up=verify_request_size(k), bytes_down=VERIFY_RESULT_SIZE, other_s=0.001, prefill=False))
    return chosen


def test_adaptive_policy_follows_measured_conditions() -> None:
    policy = make_policy(DraftPolicyConfig(policy="adaptive"))  # type: ignore[call-arg]
    assert isinstance(policy, AdaptiveDraftLen)
    calm = _feed(policy, 80, alpha=0.8, rtt_s=0.02)[-20:]
    slow_link = _feed(policy, 80, alpha=0.8, rtt_s=1.0)[-20:]  # RTT grew to 1 s: longer drafts pay
    assert min(slow_link) > max(calm)
    poor = _feed(policy, 80, alpha=0.1, rtt_s=0.02)[-20:]  # the drafter stopped agreeing: draft little
    assert max(poor) <= 1
    described = policy.describe()
    assert described["alpha"] < 0.3 and described["rtt_s"] == pytest.approx(0.02, abs=0.05)


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError):
        DraftPolicyConfig(policy="magic")  # type: ignore[arg-type]


def test_positional_expected_tokens() -> None:
    assert expected_tokens(3, [0.5]) == pytest.approx(expected_tokens(3, 0.5))
    assert expected_tokens(2, [0.5, 1.0]) == pytest.approx(1 + 0.5 + 0.5)
    assert expected_tokens(0, [0.9]) == 1.0


def test_bursty_acceptance_favours_longer_drafts() -> None:
    """Rounds either accept everything or fail at once: same pooled alpha, longer best k."""
    from aiflow_ray.speculative.policy import AcceptanceEstimator

    bursty = AcceptanceEstimator(0.7, 0.0, forget=1.0)
    for _ in range(50):
        bursty.update(8, 8)
        bursty.update(8, 0)
    positional = bursty.positional(8)
    assert positional[0] == pytest.approx(0.5, abs=0.05) and positional[5] > 0.9
    link = LinkCosts(0.02, 1e6, 1e6)
    k_pooled = best_draft_len(bursty.alpha, CPU_PAIR, link, verify_request_size, VERIFY_RESULT_SIZE, 24)[0]
    k_positional = best_draft_len(positional, CPU_PAIR, link, verify_request_size, VERIFY_RESULT_SIZE, 24)[0]
    assert k_positional > k_pooled
