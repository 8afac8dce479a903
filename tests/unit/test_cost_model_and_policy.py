from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiflow_ray.config import DraftPolicyConfig
from aiflow_ray.network.wire import VERIFY_RESULT_SIZE, verify_request_size
from aiflow_ray.routing.persistence import export_state, restore_state
from aiflow_ray.routing.router import RouterState
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


# -- the edge's forward cost as a curve -------------------------------------------------------------
# Raw llama.cpp on the 1.5B model, idle, 2 threads: ms for a block of 1 / 2 / 4 / 8 / 16 tokens.
LLAMA_CPP_MS = {1: 33.0, 2: 49.0, 4: 76.0, 8: 158.0, 16: 217.0}


def _served_forwards(rng: np.random.Generator, n: int) -> list[tuple[int, float]]:
    """What an edge replica reports: prompt prefills (tens of tokens, cheap per token), one-token decodes and
    k-token verifies together, with timing noise: no line fits them all."""
    out = []
    for _ in range(n):
        kind = rng.integers(3)
        if kind == 0:
            fed = int(rng.integers(20, 90))
            seconds = 0.217 + 0.006 * (fed - 16)  # 6 ms a token past 16, against 33 for one
        else:
            fed = 1 if kind == 1 else int(rng.choice([2, 4, 8, 16]))
            seconds = LLAMA_CPP_MS[fed] / 1e3
        out.append((fed, seconds * float(rng.uniform(0.9, 1.1))))
    return out


def test_the_router_reads_verify_costs_from_a_curve_that_holds_on_llama_cpp() -> None:
    from aiflow_ray.network.estimators import ForgettingLinearFit
    from aiflow_ray.routing.messages import LoadReport, RouteRequest

    rng = np.random.default_rng(0)
    forwards = _served_forwards(rng, 300)
    line = ForgettingLinearFit(0.95, prior_slope=0.0, prior_strength=4.0)
    for fed, seconds in forwards:
        line.observe(float(fed), seconds)
    slope = max(line.slope(), 0.0)
    old_decode_ms = (line.intercept(slope) + slope) * 1e3
    assert abs(old_decode_ms / LLAMA_CPP_MS[1] - 1) > 0.2  # the old model: one line, wrong by 20% or more

    state = RouterState()
    for start in range(0, len(forwards), 20):
        state.report_load(LoadReport(tier="edge", replica="r1", ongoing=0, queued=0, capacity=4,
                                     service_samples=tuple(forwards[start:start + 20])))
    compute = state.inputs("").compute
    for fed, ms in LLAMA_CPP_MS.items():
        assert compute.verify_s(fed - 1) * 1e3 == pytest.approx(ms, rel=0.06), fed
    table = [compute.verify_s(k) for k in range(state.cfg.max_draft_len + 1)]
    assert all(t > 0 for t in table) and table == sorted(table)
    decision = state.decide(RouteRequest(request_id="r", link_id="", path="auto", quality="exact",
                                         prompt_bytes=200, max_new_tokens=64))
    assert min(decision.predicted_s_per_token.values()) > 0
    assert decision.predicted_tpot_s["server-only"] * 1e3 == pytest.approx(33.0, rel=0.06)
    # Saved and restored with the router's state.
    restored = RouterState()
    restore_state(restored, export_state(state))
    assert restored.inputs("").compute.verify_s(3) == pytest.approx(compute.verify_s(3), rel=0.02)


@given(samples=st.lists(st.tuples(st.integers(1, 5000), st.floats(0.0, 5.0)), min_size=1, max_size=60),
       queries=st.lists(st.floats(1.0, 10000.0), min_size=2, max_size=20))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_the_forward_cost_curve_is_monotone_and_never_negative(samples: list[tuple[int, float]],
                                                               queries: list[float]) -> None:
    from aiflow_ray.network.estimators import ForwardCostCurve

    curve = ForwardCostCurve()
    for fed, seconds in samples:
        curve.observe(fed, seconds)
    curve.observe(3, -1.0)  # a clock that went backwards: ignored
    values = [curve.seconds(x) for x in sorted(queries)]
    assert all(v is not None and v >= 0 for v in values)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))  # type: ignore[operator]


def test_a_calibration_replaces_what_the_curve_held_at_its_size() -> None:
    from aiflow_ray.network.estimators import ForwardCostCurve

    curve = ForwardCostCurve()
    for _ in range(20):
        curve.observe(4, 0.125)  # timed while every tier loaded its model
        curve.observe(1, 0.007)
    curve.replace(4, 0.012)
    assert curve.seconds(4) == pytest.approx(0.012)
    assert curve.seconds(1) == pytest.approx(0.007)  # other sizes keep their history


def test_each_decision_gets_its_measured_outcome_and_each_path_its_median_error() -> None:
    from aiflow_ray.routing.messages import LoadReport, RouteRequest

    state = RouterState()
    state.report_load(LoadReport(tier="edge", replica="r1", ongoing=0, queued=0, capacity=4))
    for i in range(5):
        decision = state.decide(RouteRequest(request_id=f"r{i}", link_id="", path="server-only", quality="exact",
                                             prompt_bytes=100, max_new_tokens=16))
        assert decision.request_id == f"r{i}"
        ttft = decision.predicted_ttft_s["server-only"] * (1.5 if i < 3 else 1.0)  # three of five 1.5x slower
        state.report_outcome(f"r{i}", "server-only", ttft, decision.predicted_tpot_s["server-only"] * 0.5, 16)
    state.report_outcome("never-decided", "server-only", 1.0, 1.0, 4)  # ignored
    errors = state.prediction_errors()
    assert errors == {"server-only": {"requests": 5, "ttft_error_median": pytest.approx(0.5),
                                      "tpot_error_median": pytest.approx(-0.5)}}
    record = state.snapshot()["recent_decisions"][-1]
    assert record["measured"]["ttft_error"] == pytest.approx(0.0) and record["measured"]["num_tokens"] == 16
    assert state.snapshot()["prediction_error"] == errors


def test_an_images_upload_is_priced_at_what_images_took_lately_never_above_its_raw_size() -> None:
    from aiflow_ray.routing.messages import LoadReport, RouteRequest

    state = RouterState()
    state.report_load(LoadReport(tier="edge", replica="r1", ongoing=0, queued=0, capacity=4))

    def request(rid: str, *raw: int) -> RouteRequest:
        return RouteRequest(request_id=rid, link_id="", path="server-only", prompt_bytes=100, image_bytes=raw)

    photo = request("photo", 3_000_000)
    assert state.upload_bytes(photo) == 100 + 3_000_000  # nothing measured yet: the raw size bounds it
    first = state.decide(photo)
    state.report_outcome("photo", "server-only", first.predicted_ttft_s["server-only"], 0.01, 8, (60_000,))
    assert state.upload_bytes(request("next", 3_000_000)) == 100 + 60_000  # a camera photo crosses resized
    assert state.upload_bytes(request("small", 2_000, 4_000_000)) == 100 + 2_000 + 60_000
    later = state.decide(request("later", 3_000_000))
    assert later.predicted_ttft_s["server-only"] < first.predicted_ttft_s["server-only"]
    assert state.snapshot()["recent_decisions"][-1]["inputs"]["prompt_bytes"] == 100 + 60_000
