"""Fail-over, deadlines and fallback, in process: a transport that fails as a dying replica or a stalled link
would, real tiny models on both ends. Greedy output must equal the fault-free output."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, GetTimeoutError

from aiflow_ray import calls
from aiflow_ray.config import GenerateOptions, LinkConfig
from aiflow_ray.errors import TierUnavailable
from aiflow_ray.network.link import DuplexLink, LinkTimeout
from aiflow_ray.routing.messages import LoadReport, RouteRequest
from aiflow_ray.routing.persistence import export_state, restore_state
from aiflow_ray.routing.router import RouterState
from aiflow_ray.serve.affinity import rendezvous_rank
from aiflow_ray.tiers.device import InProcessTransport
from aiflow_ray.tiers.paths import DeviceSide, run_path
from aiflow_ray.tiers.pipeline import Pipeline
from aiflow_ray.tiers.resilience import Resilience
from tests.conftest import PROMPTS

VIRTUAL = LinkConfig(virtual_time=True)  # type: ignore[call-arg]


class FlakyTransport(InProcessTransport):
    """Fails the listed exchange / stream-message numbers with the given exception, like a dying edge."""

    def __init__(self, pipeline: Pipeline, fail_at: dict[int, Exception], fail_stream_at: int | None = None,
                 every_stream: bool = False) -> None:
        super().__init__(pipeline.edge, DuplexLink.from_config(VIRTUAL))
        self.fail_at = fail_at
        self.fail_stream_at = fail_stream_at
        self.every_stream = every_stream
        self.calls = 0
        self.streams = 0

    def exchange(self, payload: bytes, link_timeout_s: float | None = None) -> bytes:
        self.calls += 1
        if self.calls in self.fail_at:
            # A dead replica loses its sessions: the retry must carry the context.
            self.edge.drop_all_sessions()
            raise self.fail_at[self.calls]
        return super().exchange(payload, link_timeout_s)

    def stream(self, payload: bytes, session_bound: bool = False) -> Iterator[tuple[bytes, float]]:
        self.streams += 1
        for i, item in enumerate(super().stream(payload)):
            if (self.streams == 1 or self.every_stream) and i == self.fail_stream_at:
                raise TierUnavailable("edge", "ActorDiedError")
            yield item


def _run(pipeline: Pipeline, transport: FlakyTransport, resilience: Resilience | None, **opts: Any):
    options = GenerateOptions(prompt=PROMPTS[0], max_new_tokens=32, link=VIRTUAL, draft_len=3, **opts)
    return run_path(options, DeviceSide(pipeline.device), transport, resilience=resilience)


def _resilience(**kw: Any) -> Resilience:
    return Resilience(time.monotonic() + 30, backoff_s=0.001, **kw)


def test_edge_failure_mid_request_fails_over_with_identical_output(tiny_pipeline: Pipeline) -> None:
    reference = _run(tiny_pipeline, FlakyTransport(tiny_pipeline, {}), None).token_ids
    transport = FlakyTransport(tiny_pipeline, {3: TierUnavailable("edge", "ActorDiedError"),
                                               5: TierUnavailable("edge", "deadline missed")})
    result = _run(tiny_pipeline, transport, _resilience())
    assert result.token_ids == reference
    assert result.trace.failovers == 2 and result.trace.fallback == ""


def test_without_resilience_a_failure_propagates(tiny_pipeline: Pipeline) -> None:
    with pytest.raises(TierUnavailable):
        _run(tiny_pipeline, FlakyTransport(tiny_pipeline, {2: TierUnavailable("edge", "x")}), None)


def test_failovers_are_bounded(tiny_pipeline: Pipeline) -> None:
    failing = {n: TierUnavailable("edge", "ActorDiedError") for n in range(2, 50)}
    with pytest.raises(TierUnavailable):
        _run(tiny_pipeline, FlakyTransport(tiny_pipeline, failing), _resilience(max_failovers=3))


def test_link_outage_fast_request_finishes_on_device(tiny_pipeline: Pipeline) -> None:
    reference = _run(tiny_pipeline, FlakyTransport(tiny_pipeline, {}), None).token_ids
    transport = FlakyTransport(tiny_pipeline, {4: LinkTimeout(120, 1.0)})
    result = _run(tiny_pipeline, transport, _resilience(fallback=True, link_timeout_s=1.0), min_tokens=32)
    cut = result.trace.fallback_at
    assert result.trace.fallback == "link outage" and cut > 0
    assert result.token_ids[:cut] == reference[:cut]
    assert len(result.token_ids) == 32
    assert result.trace.link_outages == [[120, 1.0]]
    # What the device continued with is the drafter's own greedy continuation of the verified prefix.
    drafter = tiny_pipeline.drafter_engine
    ids = drafter.encode_prompt(PROMPTS[0], chat=True) + result.token_ids[:cut]
    alone = Pipeline(drafter, drafter).target_greedy(ids, 32 - cut)
    assert result.token_ids[cut:] == alone[: 32 - cut]


def test_link_outage_exact_request_is_retryable_not_answered_by_the_device(tiny_pipeline: Pipeline) -> None:
    transport = FlakyTransport(tiny_pipeline, {n: LinkTimeout(120, 1.0) for n in range(2, 50)})
    with pytest.raises(TierUnavailable):
        _run(tiny_pipeline, transport, _resilience(max_failovers=2))


def test_server_only_stream_resumes_after_edge_failure(tiny_pipeline: Pipeline) -> None:
    reference = _run(tiny_pipeline, FlakyTransport(tiny_pipeline, {}), None, path="server-only").token_ids
    transport = FlakyTransport(tiny_pipeline, {}, fail_stream_at=7)
    result = _run(tiny_pipeline, transport, _resilience(), path="server-only")
    assert result.token_ids == reference
    assert transport.streams == 2 and result.trace.failovers == 1


def test_server_only_fast_request_finishes_on_device_when_the_edge_stays_down(tiny_pipeline: Pipeline) -> None:
    reference = _run(tiny_pipeline, FlakyTransport(tiny_pipeline, {}), None, path="server-only").token_ids
    transport = FlakyTransport(tiny_pipeline, {}, fail_stream_at=5, every_stream=True)
    result = _run(tiny_pipeline, transport, _resilience(fallback=True), path="server-only", min_tokens=32)
    cut = result.trace.fallback_at
    assert result.trace.fallback == "ActorDiedError" and cut == 10  # 5 tokens before each of two failures
    assert result.token_ids[:cut] == reference[:cut] and len(result.token_ids) == 32
    drafter = tiny_pipeline.drafter_engine
    ids = drafter.encode_prompt(PROMPTS[0], chat=True) + result.token_ids[:cut]
    assert result.token_ids[cut:] == Pipeline(drafter, drafter).target_greedy(ids, 32 - cut)[: 32 - cut]


def test_deadline_ends_a_generation(tiny_pipeline: Pipeline) -> None:
    with pytest.raises(TierUnavailable, match="deadline"):
        _run(tiny_pipeline, FlakyTransport(tiny_pipeline, {}), Resilience(time.monotonic() - 1))


# -- calls ------------------------------------------------------------------------------------------
class _Response:
    def __init__(self, result: Any = None, exc: Exception | None = None) -> None:
        self._result, self._exc = result, exc
        self.cancelled = False

    def result(self, timeout_s: float | None = None) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._result

    def cancel(self) -> None:
        self.cancelled = True


def test_call_maps_replica_failures_and_deadlines_to_tier_unavailable() -> None:
    assert calls.call("edge", _Response(b"ok"), 1.0) == b"ok"
    for exc in (ActorDiedError(), GetTimeoutError("late")):
        response = _Response(exc=exc)
        with pytest.raises(TierUnavailable):
            calls.call("edge", response, 1.0)
        assert response.cancelled
    with pytest.raises(ValueError):  # a bug is not a tier failure
        calls.call("edge", _Response(exc=ValueError("bug")), 1.0)


def test_with_failover_retries_then_gives_up() -> None:
    attempts: list[int] = []

    def attempt() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise TierUnavailable("cloud", "ActorDiedError")
        return "answer"

    assert calls.with_failover("cloud", attempt, time.monotonic() + 10, backoff_s=0.001) == "answer"
    assert len(attempts) == 3
    with pytest.raises(TierUnavailable):
        calls.with_failover("cloud", lambda: (_ for _ in ()).throw(TierUnavailable("cloud", "x")),
                            time.monotonic() + 10, backoff_s=0.001, max_attempts=2)


class _Stream:
    def __init__(self, items: list[Any], stall: bool = False) -> None:
        self.items, self.stall = items, stall
        self.cancelled = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        yield from self.items
        if self.stall:
            self.cancelled.wait(5)

    def cancel(self) -> None:
        self.cancelled.set()


def test_iterate_bounds_each_item_and_cancels_a_stalled_stream() -> None:
    assert list(calls.iterate("edge", _Stream([1, 2, 3]), 1.0)) == [1, 2, 3]
    stalled = _Stream([1], stall=True)
    got = []
    started = time.monotonic()
    with pytest.raises(TierUnavailable, match="deadline"):
        for item in calls.iterate("edge", stalled, 0.2):
            got.append(item)
    assert got == [1] and time.monotonic() - started < 2 and stalled.cancelled.is_set()


# -- session affinity -------------------------------------------------------------------------------
def test_rendezvous_rank_is_stable_and_moves_only_the_lost_replicas_sessions() -> None:
    replicas = ["r1", "r2", "r3"]
    sessions = [f"{i:032x}" for i in range(300)]
    first = {s: rendezvous_rank(s, replicas)[0] for s in sessions}
    assert first == {s: rendezvous_rank(s, list(reversed(replicas)))[0] for s in sessions}
    assert all(100 - 40 < list(first.values()).count(r) < 100 + 40 for r in replicas)  # balanced
    after = {s: rendezvous_rank(s, ["r1", "r3"])[0] for s in sessions}
    assert all(after[s] == first[s] for s in sessions if first[s] != "r2")


# -- router state -----------------------------------------------------------------------------------
def test_router_state_survives_export_and_restore() -> None:
    from aiflow_ray.routing.messages import GenerationReport

    state = RouterState()
    state.report_generation(GenerationReport(link_id="phone", path="probe",
                                             probe_pairs=(((60, 0.021), (1084, 0.0225)),)))
    state.report_generation(GenerationReport(link_id="", path="calibration", on_device_s_per_token=0.031))
    for fed in (1, 4, 8):
        state.verify_cost.observe(fed, 0.05 + 0.004 * fed)
    restored = RouterState()
    restore_state(restored, export_state(state))
    assert restored.links["phone"].estimate().bandwidth_bps == pytest.approx(
        state.links["phone"].estimate().bandwidth_bps, rel=1e-6)
    assert restored.draft_s.value == pytest.approx(0.031)
    assert restored.inputs("phone").compute.verify_s(4) == pytest.approx(state.inputs("phone").compute.verify_s(4),
                                                                          rel=0.05)
    restore_state(RouterState(), {"version": 99, "links": "garbage"})  # another version's record: ignored


def test_a_restarted_router_decides_from_the_saved_tiers_until_they_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seconds between a router restart and the replicas' next load reports: decisions take the tiers
    as saved (they were up), not as down; readiness keeps the measured view; the window closes."""
    from aiflow_ray.routing import router as router_module

    clock = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: clock[0])
    state = RouterState()
    state.report_load(LoadReport(tier="edge", replica="a", ongoing=1, queued=0, capacity=4))
    saved = export_state(state)
    assert saved["tier_capacity"] == {"edge": 4}  # the cloud never reported: nothing to assume for it
    exact = RouteRequest(request_id="r", link_id="phone", quality="exact")

    restored = RouterState()
    restore_state(restored, saved)
    decision = restored.decide(exact)
    assert decision.refusal is None and decision.path in ("device-edge", "server-only"), decision.reason
    assert not restored.tier_load("edge").available, "readiness must not count an assumed tier as reported"
    assert not restored.tier_load("cloud", assume_saved=True).available
    clock[0] += 10  # no report within the staleness window: the edge is down after all
    assert restored.decide(exact).refusal is not None

    again = RouterState()
    restore_state(again, saved)
    again.report_load(LoadReport(tier="edge", replica="b", ongoing=0, queued=0, capacity=2))
    assert again.tier_load("edge", assume_saved=True).capacity == 2, "a report replaces the assumption"
    assert RouterState().decide(exact).refusal is not None, "a first start assumes nothing"


def test_loads_from_dead_nodes_do_not_count() -> None:
    state = RouterState()
    state.report_load(LoadReport(tier="edge", replica="a", ongoing=0, queued=0, capacity=4, node_id="n1"))
    assert state.tier_load("edge").available
    state.dead_nodes = {"n1"}
    assert not state.tier_load("edge").available
