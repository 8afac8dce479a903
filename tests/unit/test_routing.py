from __future__ import annotations

from dataclasses import replace

import pytest

from aiflow_ray.routing.classes import request_class
from aiflow_ray.routing.messages import GenerationReport, LoadReport, RouteRequest
from aiflow_ray.routing.persistence import export_state, restore_state
from aiflow_ray.routing.policy import Decision, RouteInputs, TierLoad, decide
from aiflow_ray.routing.router import RouterState
from aiflow_ray.speculative.cost_model import ComputeCosts, LinkCosts

CPU = ComputeCosts(draft_s_per_token=0.09, verify_base_s=0.2, verify_per_token_s=0.005)


def _inputs(bandwidth_bps: float = 1e6, rtt_s: float = 0.02, edge: TierLoad | None = None,
            cloud: TierLoad | None = None, slo_s: float = 0.25) -> RouteInputs:
    return RouteInputs(alpha=0.8, compute=CPU, link=LinkCosts(rtt_s, bandwidth_bps, bandwidth_bps),
                       edge=edge or TierLoad(), cloud=cloud or TierLoad(), fast_slo_s_per_token=slo_s)


def test_exact_takes_the_large_model_with_a_draft_length() -> None:
    decision = decide("auto", "exact", _inputs())
    assert decision.path == "device-edge" and decision.draft_len >= 1
    assert decision.predicted_tpot_s["device-edge"] < decision.predicted_tpot_s["server-only"]


def test_fast_moves_to_the_device_when_the_link_is_slow() -> None:
    assert decide("auto", "fast", _inputs(rtt_s=0.02)).path == "device-edge"
    # On a terrible link both large-model paths miss a tight objective: the device answers.
    slow = decide("auto", "fast", _inputs(bandwidth_bps=200, rtt_s=0.5, slo_s=0.15))
    assert slow.path == "on-device" and "objective" in slow.reason
    # Only token ids cross, so a low bandwidth alone leaves server-only (streamed ids) viable.
    assert decide("auto", "fast", _inputs(bandwidth_bps=200, rtt_s=0.5)).path == "server-only"


def test_fast_counts_the_raw_input_upload_and_comes_back_when_the_link_recovers() -> None:
    tiny = ComputeCosts(draft_s_per_token=0.0006, verify_base_s=0.0015, verify_per_token_s=0.0001)

    def fast(bandwidth_bps: float) -> str | None:
        inputs = RouteInputs(alpha=0.8, compute=tiny, link=LinkCosts(0.002, bandwidth_bps, bandwidth_bps),
                             edge=TierLoad(), cloud=TierLoad(), fast_slo_s_per_token=0.005,
                             prompt_bytes=2000, max_new_tokens=24)
        decision = decide("auto", "fast", inputs)
        # The objective is latency per output token with the upload in TTFT, not TPOT alone.
        assert decision.predicted_s_per_token["server-only"] > decision.predicted_tpot_s["server-only"]
        return decision.path

    assert fast(2e6) in ("device-edge", "server-only")
    assert fast(10e3) == "on-device"  # 2 KB at 10 KB/s is 200 ms before the first token
    assert fast(2e6) in ("device-edge", "server-only")


def test_edge_down_or_saturated() -> None:
    down = TierLoad(available=False, capacity=0)
    assert decide("auto", "fast", _inputs(edge=down)).path == "on-device"
    assert decide("auto", "exact", _inputs(edge=down)).path is None
    busy = TierLoad(True, ongoing=8, queued=4, capacity=8, queue_limit=32)
    shed = decide("device-edge", "fast", _inputs(edge=busy))
    assert shed.path == "on-device" and "saturated" in shed.reason
    queued = decide("auto", "fast", RouteInputs(**{**_inputs(edge=busy).__dict__, "shed_to_device": False}))
    assert queued.path in ("device-edge", "server-only") and "queueing" in queued.reason


def test_a_busy_edge_queues_exact_requests_up_to_its_bound_then_refuses_with_retry_after() -> None:
    # Every slot taken: an exact request waits in the bounded queue rather than being refused.
    busy = TierLoad(True, ongoing=4, queued=0, capacity=4, queue_limit=8, drain_rps=1.0)
    for requested in ("auto", "device-edge", "server-only"):
        decision = decide(requested, "exact", _inputs(edge=busy))
        assert decision.path in ("device-edge", "server-only") and decision.refusal is None, decision
        assert "queued behind 1 of at most 8" in decision.reason
    # The router's own count (requests admitted, not ended) counts even when the reports lag behind.
    counted = TierLoad(True, ongoing=0, queued=0, capacity=4, in_flight=12, queue_limit=8, drain_rps=1.0)
    refused = decide("auto", "exact", _inputs(edge=counted))
    assert refused.path is None and refused.refusal is not None and refused.refusal.status == 503
    assert "edge full: 12 requests for 4 slots and a queue of 8" in refused.reason
    assert refused.refusal.retry_after_s is not None and refused.refusal.retry_after_s >= 1
    within = TierLoad(True, ongoing=0, queued=0, capacity=4, in_flight=11, queue_limit=8, drain_rps=1.0)
    assert decide("auto", "exact", _inputs(edge=within)).path is not None
    # Until a saturated pace is measured (the paces known then come from lighter load), the queue is sized as
    # if the slots' requests ran one after another, but never below one waiting request per slot.
    unmeasured = TierLoad(True, ongoing=0, queued=0, capacity=4, in_flight=11, queue_limit=8)
    assert decide("auto", "exact", _inputs(edge=unmeasured)).path is not None  # 300 s: room for all 8
    minute = RouteInputs(**{**_inputs(edge=unmeasured).__dict__, "request_deadline_s": 60.0})
    assert "a queue of 4" in decide("auto", "exact", minute).reason  # serially only 1 would end within 60 s
    measured = RouteInputs(**{**minute.__dict__, "edge": replace(unmeasured, drain_rps=4 / 11.2)})
    assert decide("auto", "exact", measured).path is not None  # the measured pace leaves room for 8
    # A queue the request would time out in is cut to what the capacity works off within the deadline.
    tight = RouteInputs(**{**_inputs(edge=within).__dict__, "request_deadline_s": 1.0, "max_new_tokens": 64})
    cut = decide("auto", "exact", tight)
    assert cut.path is None and "a queue of 0" in cut.reason
    # Without room, fast requests still go to the device, never to the queue.
    assert decide("auto", "fast", _inputs(edge=counted)).path == "on-device"


def test_the_router_counts_requests_in_flight_until_they_end() -> None:
    state = RouterState(queue_limits={"edge": 1, "cloud": 0})
    state.report_load(LoadReport(tier="edge", replica="e0", ongoing=0, queued=0, capacity=2))
    state.report_load(LoadReport(tier="cloud", replica="c0", ongoing=0, queued=0, capacity=2))

    def ask(request_id: str) -> str | None:
        return state.decide(RouteRequest(request_id=request_id, link_id="l", path="server-only",
                                          quality="exact")).path

    assert [ask(f"r{i}") for i in range(3)] == ["server-only"] * 3  # 2 slots and 1 queued
    assert ask("r3") is None  # the replicas' reports still say idle: the router's count refuses it
    assert state.tier_load("edge").in_flight == 3
    state.report_outcome("r0", "server-only", 0.1, 0.01, 8)  # ended with an outcome
    state.report_end("r1")  # ended without one (a failure, a client gone)
    assert state.tier_load("edge").in_flight == 1
    assert ask("r4") == "server-only"
    grounded = RouteRequest(request_id="g", link_id="l", path="auto", quality="grounded")
    assert state.decide(grounded).path == "device-edge-cloud" and state.tier_load("cloud").in_flight == 1
    assert state.tier_load("edge").in_flight == 2


def test_the_device_tier_runs_every_path_and_is_admitted_like_the_others() -> None:
    state = RouterState(queue_limits={"device": 1, "edge": 32, "cloud": 32})
    state.report_load(LoadReport(tier="edge", replica="e0", ongoing=0, queued=0, capacity=8))
    state.report_load(LoadReport(tier="cloud", replica="c0", ongoing=0, queued=0, capacity=8))

    def ask(request_id: str, path: str = "on-device") -> Decision:
        return state.decide(RouteRequest(request_id=request_id, link_id="l", path=path))

    # Until the device tier reports, it gates nothing (a single process, the unit tests' servers).
    assert all(ask(f"u{i}").path == "on-device" for i in range(6))
    for i in range(6):
        state.report_end(f"u{i}")
    state.report_load(LoadReport(tier="device", replica="d0", ongoing=0, queued=0, capacity=2))
    assert [ask("d0").path, ask("d1", "server-only").path, ask("d2", "device-edge").path] == [
        "on-device", "server-only", "device-edge"]  # 2 slots and 1 queued, whatever the path
    assert "device busy, queued behind 1 of at most 1" in state.decisions[-1]["reason"]
    refused = ask("d3", "server-only")
    assert refused.path is None and refused.refusal is not None and refused.refusal.status == 503
    assert "device full: 3 requests for 2 slots and a queue of 1" in refused.reason
    assert state.tier_load("device").in_flight == 3 and state.tier_load("edge").in_flight == 2
    state.report_outcome("d1", "server-only", 0.1, 0.01, 8)
    assert state.tier_load("device").in_flight == 2 and state.tier_load("edge").in_flight == 1
    assert ask("d4").path == "on-device"


def test_the_queue_is_sized_from_the_measured_pace_and_the_clients_timeout() -> None:
    # 4 slots, 3 ahead; an idle request takes about 11 s: 3 queued fit the 300 s deadline at the idle pace.
    waiting = TierLoad(True, ongoing=4, queued=0, capacity=4, in_flight=7, queue_limit=32)
    assert decide("auto", "exact", _inputs(edge=waiting)).path is not None
    # Measured under load, the tier finished 0.02 requests per second (200 s a slot): 3 ahead no longer fit.
    slow = TierLoad(True, ongoing=4, queued=0, capacity=4, in_flight=7, queue_limit=32, drain_rps=0.02)
    refused = decide("auto", "exact", _inputs(edge=slow))
    assert refused.path is None and "a queue of 2 (sized for a 300 s deadline at 200.0 s a request)" in refused.reason
    assert refused.refusal is not None and refused.refusal.retry_after_s == 60  # capped
    # A client that says it waits 20 s is refused a queue the server's deadline would still allow.
    idle_pace = TierLoad(True, ongoing=4, queued=0, capacity=4, in_flight=7, queue_limit=32, drain_rps=0.5)
    assert decide("auto", "exact", _inputs(edge=idle_pace)).path is not None
    impatient = RouteInputs(**{**_inputs(edge=idle_pace).__dict__, "client_timeout_s": 20.0})
    cut = decide("auto", "exact", impatient)
    assert cut.path is None and "sized for a 16 s deadline" in cut.reason  # 80% of the client's 20 s
    # A streamed read timeout bounds the first token only: the wait plus a TTFT fits where a whole answer not.
    first_byte = RouteInputs(**{**impatient.__dict__, "client_timeout_first_byte": True})
    assert decide("auto", "exact", first_byte).path is not None


def test_the_router_measures_a_saturated_tiers_pace_from_its_completions(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiflow_ray.routing import router as router_module

    now = [1000.0]
    monkeypatch.setattr(router_module.time, "monotonic", lambda: now[0])
    state = RouterState(queue_limits={"edge": 32, "cloud": 0})
    state.report_load(LoadReport(tier="edge", replica="e0", ongoing=0, queued=0, capacity=4))
    for i in range(8):  # 4 slots, and 4 queued (one a slot until the pace is measured)
        assert state.decide(RouteRequest(request_id=f"r{i}", link_id="l", path="server-only",
                                         quality="exact")).path == "server-only"
    assert state.drain_rps("edge") is None  # nothing completed yet
    for i in range(5):  # one completion every 4 s while every slot is taken
        now[0] += 4.0
        state.report_load(LoadReport(tier="edge", replica="e0", ongoing=4, queued=0, capacity=4))
        state.report_outcome(f"r{i}", "server-only", 0.1, 0.01, 8)
    assert state.drain_rps("edge") == pytest.approx(0.25)
    assert state.tier_load("edge").drain_rps == pytest.approx(0.25)
    # Completions with free slots say nothing of the pace; a gap that spans idle time is not measured.
    for i in (5, 6):
        now[0] += 100.0
        state.report_load(LoadReport(tier="edge", replica="e0", ongoing=1, queued=0, capacity=4))
        state.report_outcome(f"r{i}", "server-only", 0.1, 0.01, 8)
    assert state.drain_rps("edge") is None  # the measured gaps left the window
    # A request that failed is no completion.
    state.report_end("r7")
    assert state._drain_gaps["edge"] and state.tier_load("edge").in_flight == 0


def test_the_measured_tpot_sizes_the_queue_from_the_first_completions() -> None:
    # No saturated-drain measurement yet, but requests lately measured 3 s a token: 64 tokens hold a slot
    # about 190 s, so of the 3 queued ahead only 2 could still end within 300 s.
    load = TierLoad(True, ongoing=4, queued=0, capacity=4, in_flight=7, queue_limit=32)
    slow = RouteInputs(**{**_inputs(edge=load).__dict__, "measured_tpot_s": {"device-edge": 3.0, "server-only": 3.0}})
    refused = decide("auto", "exact", slow)
    assert refused.path is None and "a queue of 2 (sized for a 300 s deadline at 189.4 s" in refused.reason
    assert decide("auto", "exact", RouteInputs(**{**slow.__dict__, "measured_tpot_s": {}})).path is not None


@pytest.mark.parametrize(("text", "images", "expected"), [
    ("Write a Python function that reverses a list.", 0, "text:code"),
    ("def fibonacci(n):", 0, "text:code"),
    ("Why is the sky blue?", 0, "text:prose"),
    ("Describe this picture.", 1, "image:prose"),
])
def test_request_classes_come_from_what_is_known_before_the_request_runs(text: str, images: int,
                                                                          expected: str) -> None:
    assert request_class(text, images) == expected


def test_acceptance_is_learned_per_request_class_and_changes_the_decision() -> None:
    state = RouterState()
    state.report_load(LoadReport(tier="edge", replica="e0", ongoing=0, queued=0, capacity=4,
                                 service_samples=tuple((k, 0.1 + 0.01 * k) for k in range(1, 10))))
    state.report_generation(GenerationReport(link_id="", path="calibration", on_device_s_per_token=0.03))
    shared = state.alpha
    assert state.alpha_for("text:code") == state.alpha_for("") == shared  # nothing learned: the shared estimate

    def run(request_id: str, request_class: str, accepted: int, rejections: int) -> None:
        state.decide(RouteRequest(request_id=request_id, link_id="l", path="device-edge", quality="exact",
                                  request_class=request_class))
        state.report_outcome(request_id, "device-edge", 0.1, 0.05, 32, accepted=accepted, rejections=rejections)

    for i in range(6):
        run(f"c{i}", "text:code", accepted=30, rejections=1)  # code drafts are nearly all accepted
        run(f"p{i}", "text:prose", accepted=4, rejections=8)
    code, prose = state.alpha_for("text:code"), state.alpha_for("text:prose")
    assert code > 0.9 > 0.5 > prose, (code, prose)
    assert state.snapshot()["alpha_by_class"] == {"text:code": round(code, 4), "text:prose": round(prose, 4)}

    def decided(request_class: str) -> dict:
        state.decide(RouteRequest(request_id="", link_id="l", path="auto", quality="exact",
                                  request_class=request_class))
        return state.decisions[-1]

    assert decided("text:code")["inputs"]["alpha"] == code and decided("text:prose")["inputs"]["alpha"] == prose
    assert decided("text:code")["draft_len"] > decided("text:prose")["draft_len"]
    # A restarted router starts from the classes' counts.
    restored = RouterState()
    restore_state(restored, export_state(state))
    assert restored.alpha_for("text:code") == pytest.approx(code, rel=0.05)


def test_grounded_needs_the_cloud_and_on_device_cannot_be_exact() -> None:
    grounded = decide("auto", "grounded", _inputs())
    assert grounded.path == "device-edge-cloud" and grounded.predicted_s_per_token["device-edge-cloud"] > 0
    assert decide("auto", "grounded", _inputs(cloud=TierLoad(available=False))).path is None
    full = decide("auto", "grounded", _inputs(cloud=TierLoad(True, ongoing=4, queued=0, capacity=4)))
    assert full.path is None and "cloud full" in full.reason
    assert full.refusal is not None and full.refusal.retry_after_s is not None
    queued = decide("auto", "grounded", _inputs(cloud=TierLoad(True, ongoing=4, queued=0, capacity=4,
                                                               queue_limit=4)))
    assert queued.path == "device-edge-cloud" and "cloud busy" in queued.reason
    # A loaded cloud is predicted slower, as a loaded edge is.
    busy = decide("auto", "grounded", _inputs(cloud=TierLoad(True, ongoing=3, queued=0, capacity=4)))
    assert busy.predicted_s_per_token["device-edge-cloud"] > grounded.predicted_s_per_token["device-edge-cloud"]



@pytest.mark.parametrize(
    ("path", "quality", "logprobs", "field"),
    [
        ("on-device", "exact", False, "quality"),
        ("on-device", "grounded", False, "quality"),
        ("device-edge", "grounded", False, "quality"),
        ("server-only", "grounded", False, "quality"),
        ("device-edge-cloud", "exact", False, "quality"),
        ("device-edge-cloud", "fast", False, "quality"),
        ("on-device", None, True, "logprobs"),
        ("device-edge-cloud", None, True, "logprobs"),
        ("auto", "grounded", True, "logprobs"),
    ],
)
def test_contradictions_are_refused_as_values_naming_the_field(path: str, quality: str | None, logprobs: bool,
                                                               field: str) -> None:
    decision = decide(path, quality, _inputs(), needs_logprobs=logprobs)  # type: ignore[arg-type]
    assert decision.path is None and decision.refusal is not None
    assert decision.refusal.status == 400 and decision.refusal.field == field
    assert "\n" not in decision.refusal.message and "Error" not in decision.refusal.message


def test_a_forced_path_without_quality_just_runs() -> None:
    for path in ("on-device", "device-edge", "server-only", "device-edge-cloud"):
        decision = decide(path, None, _inputs())
        assert decision.path == path and decision.refusal is None


def test_logprobs_keep_fast_requests_on_the_large_model() -> None:
    down = TierLoad(available=False, capacity=0)
    assert decide("auto", "fast", _inputs(edge=down)).path == "on-device"
    refused = decide("auto", "fast", _inputs(edge=down), needs_logprobs=True)
    assert refused.path is None and refused.refusal is not None and refused.refusal.status == 503
    assert refused.refusal.retry_after_s == 1
    slow = decide("auto", "fast", _inputs(bandwidth_bps=200, rtt_s=0.5, slo_s=0.15), needs_logprobs=True)
    assert slow.path in ("device-edge", "server-only")


def test_router_state_learns_from_reports_and_records_decisions() -> None:
    state = RouterState()
    state.report_load(LoadReport(tier="edge", replica="r1", ongoing=0, queued=0, capacity=4,
                                 service_samples=((5, 0.21),) * 20))
    state.report_load(LoadReport(tier="cloud", replica="c1", ongoing=0, queued=0, capacity=4))
    for _ in range(30):
        state.report_generation(GenerationReport(
            link_id="phone", path="device-edge", rounds=5, drafted=20, accepted=5, rejections=5,
            draft_s=1.0, draft_tokens=20, link_samples=((90, 0.3), (3000, 0.33))))
    assert state.alpha < 0.6
    est = state.links["phone"].estimate()
    assert est.rtt_s == pytest.approx(0.3, abs=0.01)
    # Service times come from the edge's own reports, whichever path produced them.
    assert state.inputs("phone").compute.verify_s(4) == pytest.approx(0.21, rel=0.05)
    decision = state.decide(RouteRequest(request_id="req-1", link_id="phone", quality="exact"))
    snap = state.snapshot()
    assert snap["recent_decisions"][-1]["request_id"] == "req-1"
    assert snap["recent_decisions"][-1]["reason"] == decision.reason
    assert snap["decision_counts"][str(decision.path)] == 1


@pytest.mark.parametrize(
    ("verify_curve", "expected"),
    [
        # llama.cpp verifier on CPU: a block of k costs almost k decodes, and the 0.5B drafts at 0.6 of the
        # 1.5B's decode (docs/benchmarks/engines.md): speculation cannot pay, server-only wins.
        (((1, 0.064), (2, 0.10), (5, 0.14), (9, 0.21)), "server-only"),
        # HF verifier: flat in k, so the same drafter at 0.2 of its cost pays off.
        (((1, 0.22), (2, 0.22), (5, 0.22), (9, 0.23)), "device-edge"),
    ],
)
def test_the_router_picks_the_path_from_the_measured_verify_curve(
        verify_curve: tuple[tuple[int, float], ...], expected: str) -> None:
    state = RouterState()
    state.report_load(LoadReport(tier="edge", replica="r1", ongoing=0, queued=0, capacity=4,
                                 service_samples=verify_curve * 10))
    state.report_generation(GenerationReport(link_id="", path="calibration", on_device_s_per_token=0.04))
    state.report_generation(GenerationReport(link_id="phone", path="probe", link_samples=((90, 0.02),) * 5))
    assert state.decide(RouteRequest(request_id="r", link_id="phone", quality="exact")).path == expected


def test_a_calibration_replaces_a_contended_start_up_timing() -> None:
    state = RouterState()
    state.report_generation(GenerationReport(link_id="", path="calibration", on_device_s_per_token=0.34))
    state.report_generation(GenerationReport(link_id="", path="calibration", on_device_s_per_token=0.04))
    assert state.inputs("phone").compute.draft_s_per_token == pytest.approx(0.04)


def test_on_device_tpot_is_learned_apart_from_the_drafting_cost() -> None:
    # A device-edge round's first draft step feeds the accepted draft and the edge's token first: a drafted
    # token costs more than an on-device one, and neither average may stand in for the other.
    state = RouterState()
    state.report_generation(GenerationReport(link_id="", path="calibration", on_device_s_per_token=0.03))
    for _ in range(30):
        state.report_generation(GenerationReport(link_id="phone", path="device-edge", rounds=5, drafted=20,
                                                 accepted=15, rejections=2, draft_s=0.9, draft_tokens=20))
        state.report_generation(GenerationReport(link_id="phone", path="on-device", rounds=32,
                                                 on_device_s_per_token=0.028))
    inputs = state.inputs("phone")
    assert inputs.compute.draft_s_per_token == pytest.approx(0.045, rel=0.01)
    assert inputs.on_device_s_per_token == pytest.approx(0.028, rel=0.01)
    assert decide("on-device", "fast", inputs).predicted_tpot_s["on-device"] == pytest.approx(0.028, rel=0.01)
    assert state.snapshot()["on_device_s_per_token"] == pytest.approx(0.028, rel=0.01)


def test_the_router_deployment_takes_what_the_ingress_reports() -> None:
    """The ingress calls the deployment's methods by keyword across a Ray hop: a signature that drifted from
    RouterState's would lose every outcome (and leave its request counted in flight for ever)."""
    import asyncio

    from aiflow_ray.serve.router_server import RouterServer

    async def run() -> RouterServer:
        server = RouterServer({}, persist=False)
        await server.report_load(LoadReport(tier="edge", replica="e0", ongoing=0, queued=0, capacity=4))
        routed = await server.decide(RouteRequest(request_id="r1", link_id="l", path="device-edge",
                                                  request_class="text:code"))
        assert routed.decision.path == "device-edge" and server.state.in_flight_count("edge") == 1
        await server.report_outcome("r1", "device-edge", 0.1, 0.02, 16, (), accepted=12, rejections=1,
                                    prompt_tokens=40)
        return server

    server = asyncio.run(run())
    assert server.state.in_flight_count("edge") == 0 and "text:code" in server.state.class_acceptance


def test_ttft_carries_the_prompts_prefill_measured_at_each_tier() -> None:
    """A long prompt's first token waits for its prefill: the edge's from its forwards over tokens fed
    (calibration and sessions' first verifies), the device's from its calibrations; the prompt's tokens from
    what earlier prompts of that many bytes took."""
    state = RouterState()
    forwards = ((1, 0.05), (4, 0.08), (8, 0.12), (128, 0.6), (512, 2.0))
    state.report_load(LoadReport(tier="edge", replica="r1", ongoing=0, queued=0, capacity=4,
                                 service_samples=forwards * 5))
    state.report_generation(GenerationReport(link_id="", path="calibration", on_device_s_per_token=0.02,
                                             prefill_samples=((6, 0.02), (128, 0.15))))
    state.report_generation(GenerationReport(link_id="phone", path="probe", link_samples=((90, 0.02),) * 5))

    def ttft(text_bytes: int, request_id: str) -> dict[str, float]:
        decision = state.decide(RouteRequest(request_id=request_id, link_id="phone", path="server-only",
                                             quality="exact", prompt_bytes=text_bytes, max_new_tokens=16))
        return decision.predicted_ttft_s

    short, long = ttft(20, "a"), ttft(2048, "b")  # 5 and 512 tokens at the prior 4 bytes a token
    # The edge's prefill of 512 tokens (2.0 s) in place of 5 tokens' (0.09 s), besides the longer upload.
    assert long["server-only"] - short["server-only"] > 2.0 - 0.09
    assert long["device-edge"] - short["device-edge"] > 1.9  # the edge's prefill, and the device's
    assert long["on-device"] > 0.15 > short["on-device"]  # 512 tokens: past the calibrated 128 (0.15 s)
    # The ingress reports what the prompt took: 2048 bytes were 1024 tokens, so the next such prompt is
    # predicted longer still.
    state.report_outcome("b", "server-only", 2.5, 0.05, 16, prompt_tokens=1024)
    assert state.prompt_tokens(2048) == 1024
    assert ttft(2048, "c")["server-only"] > long["server-only"] + 1.0
    saved = export_state(state)
    restored = RouterState()
    restore_state(restored, saved)
    assert restored.prompt_tokens(2048) == 1024
    assert restored.inputs("phone", prompt_tokens=128).device_prefill_s == pytest.approx(0.15, rel=0.05)
    # On-device requests' first tokens teach the device's prefill: a start-up timing of 128 tokens at 1.5 s
    # (taken while the tiers loaded) gives way to what such requests measure (0.15 s).
    state.report_generation(GenerationReport(link_id="", path="calibration", on_device_s_per_token=0.02,
                                             prefill_samples=((128, 1.5),)))
    for i in range(12):
        state.decide(RouteRequest(request_id=f"od{i}", link_id="phone", path="on-device", quality="fast",
                                  prompt_bytes=512, max_new_tokens=16))
        state.report_outcome(f"od{i}", "on-device", 0.15, 0.02, 16, prompt_tokens=128)
    assert state.inputs("phone", prompt_tokens=128).device_prefill_s < 0.5
    # An idle replica's re-calibration replaces the sizes it times; the others keep their history.
    state.report_load(LoadReport(tier="edge", replica="r1", ongoing=0, queued=0, capacity=4,
                                 calibration_samples=((4, 0.06), (128, 0.3))))
    assert state.inputs("phone").compute.verify_s(3) == pytest.approx(0.06)
    assert state.inputs("phone", prompt_tokens=128).edge_prefill_s == pytest.approx(0.3)
    assert state.inputs("phone").compute.verify_s(7) == pytest.approx(0.12)


def test_a_shared_host_prices_drafting_into_the_edge_queue() -> None:
    """Idle, server-only wins on llama.cpp-like costs; behind a long edge queue speculation wins where the
    devices draft on their own hardware, and does not where they draft on the edge's CPUs."""
    from aiflow_ray.serve.router_server import shared_host

    costs = ComputeCosts(draft_s_per_token=0.03, verify_base_s=0.0, verify_per_token_s=0.0,
                         verify_table_s=(0.04, 0.045, 0.06, 0.07, 0.08))
    busy = TierLoad(ongoing=4, queued=12, capacity=4, queue_limit=32)

    def path(edge: TierLoad, shared: bool) -> str | None:
        inputs = RouteInputs(alpha=0.8, compute=costs, link=LinkCosts(0.02, 1e6, 1e6), edge=edge, cloud=TierLoad(),
                             shared_host=shared)
        return decide("auto", "exact", inputs).path

    assert path(TierLoad(), shared=False) == path(TierLoad(), shared=True) == "server-only"
    assert path(busy, shared=False) == "device-edge"
    assert path(busy, shared=True) == "server-only"
    local = [{"NodeID": str(i), "Alive": True, "NodeManagerAddress": "127.0.0.1"} for i in range(4)]
    assert shared_host(local)
    assert not shared_host([*local, {"NodeID": "9", "Alive": True, "NodeManagerAddress": "10.0.0.7"}])
    assert shared_host([*local, {"NodeID": "9", "Alive": False, "NodeManagerAddress": "10.0.0.7"}])


def test_prompt_tokens_carry_a_fixed_template_overhead_besides_the_bytes() -> None:
    # A chat template adds about 30 tokens to every prompt: a 7-byte warm-up that took 31 tokens must not
    # price a 70-byte prompt at 4.4 tokens a byte (310 tokens, and a prefill to match).
    state = RouterState()
    state.decide(RouteRequest(request_id="w", link_id="phone", path="on-device", quality="fast", prompt_bytes=7))
    state.report_outcome("w", "on-device", 0.3, 0.05, 16, prompt_tokens=31)
    assert 40 <= state.prompt_tokens(70) <= 55
    # Prompts spread in length teach the slope as well: tokens = 30 + 0.3 a byte.
    for i, text_bytes in enumerate([40, 120, 260, 80, 400, 200] * 3):
        state.decide(RouteRequest(request_id=f"r{i}", link_id="phone", path="on-device", quality="fast",
                                  prompt_bytes=text_bytes))
        state.report_outcome(f"r{i}", "on-device", 0.3, 0.05, 16, prompt_tokens=round(30 + 0.3 * text_bytes))
    assert state.prompt_tokens(1000) == pytest.approx(330, rel=0.1)
    assert state.prompt_tokens(10) == pytest.approx(33, rel=0.15)
    snapshot = state.snapshot()["prompt_tokens"]
    assert snapshot["overhead_tokens"] == pytest.approx(30, rel=0.2)
    restored = RouterState()
    restore_state(restored, export_state(state))
    assert restored.prompt_tokens(1000) == state.prompt_tokens(1000)
