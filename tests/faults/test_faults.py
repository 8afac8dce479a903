"""Fault drills on a real local cluster: every request answers 200 (greedy output identical to a fault-free
run) or an explicit retryable error (503/429 with Retry-After, JSON); none hangs, none is a bare 500.

Run in file order: the node drill last, since it takes a whole tier away for a while.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.faults.conftest import CLIENT_TIMEOUT_S, Drill, Outcome

pytestmark = [pytest.mark.integration, pytest.mark.faults]

PROMPTS = [
    "Write a Python function that reverses a list.",
    "Explain what a hash map is in two sentences.",
    "List three uses of a priority queue.",
    "def fibonacci(n):",
]


def _body(prompt: str, **extra: object) -> dict[str, object]:
    return {"prompt": prompt, "max_tokens": 40, "path": "device-edge", "draft_len": 3, "link_id": "drill",
            **extra}


def _reference(drill: Drill, **extra: object) -> dict[str, list[int]]:
    out = {}
    for prompt in PROMPTS:
        outcome = drill.send(_body(prompt, **extra))
        assert outcome.ok, (outcome.status, outcome.json)
        out[prompt] = outcome.token_ids
    return out


def _check(outcomes: list[Outcome], reference: dict[str, list[int]] | None = None) -> None:
    """The drill's contract: 200 (identical output when a reference is given) or a retryable refusal."""
    for o in outcomes:
        assert o.status != 500, f"bare 500: {o.error or o.json}"
        assert o.elapsed_s < CLIENT_TIMEOUT_S - 1, f"request hung for {o.elapsed_s:.0f} s"
        assert o.ok or o.retryable, f"status {o.status} {o.retry_after=} {o.json or o.error}"
        if o.ok and reference is not None:
            assert o.token_ids == reference[str(o.body["prompt"])], "output differs from the fault-free run"


@pytest.fixture(scope="module")
def slow_link(drill: Drill) -> None:
    # Rounds of ~60 ms: a request lasts about a second, so kills land mid-verify.
    drill.set_link("drill", 2e6, 60)


def test_session_affinity_two_edge_replicas(drill: Drill, slow_link: None) -> None:
    """Every round of a session reaches the replica holding it: context resends under 5% of rounds."""
    rounds = resends = 0
    outcomes, _, _ = drill.load([_body(p, max_tokens=32) for p in PROMPTS * 3], concurrency=4)
    for o in outcomes:
        assert o.ok, (o.status, o.json)
        rounds += o.json["trace"]["rounds"]
        resends += o.json["trace"]["context_resends"]
    assert rounds > 50
    assert resends / rounds < 0.05, f"{resends} context resends in {rounds} rounds"
    drill.record("none (2 edge replicas, affinity)", outcomes, None,
                 f"context resends {resends} of {rounds} rounds ({100 * resends / rounds:.1f}%)")


def test_a_request_that_switches_path_continues_on_the_replica_holding_its_session(drill: Drill,
                                                                                  slow_link: None) -> None:
    """A device-edge request re-decided mid-way (tiers/device.py, PathSwitch) goes on server-only from the
    session its rounds built: with two edge replicas the continuation must reach the one holding it (the
    other would ask for the prompt: a context resend), and the output is server-only's."""
    from ray import serve

    from aiflow_ray.config import GenerateOptions

    device = serve.get_deployment_handle("DeviceDrafter", app_name=drill.app)
    for prompt in PROMPTS:
        # The router sets switch_tpot_s from its server-only prediction; any measured round is slower than this.
        opts = GenerateOptions(prompt=prompt, path="device-edge", draft_len=3, max_new_tokens=40, link_id="drill",
                               switch_tpot_s=1e-9)
        result = device.generate.remote(opts).result(timeout_s=CLIENT_TIMEOUT_S)
        assert result.trace.switched_at > 0, result.trace
        assert result.trace.context_resends == 0 and result.trace.failovers == 0, result.trace
        server_only = drill.send(_body(prompt, path="server-only"))
        assert server_only.ok and result.token_ids == server_only.token_ids


def test_edge_replica_killed_mid_verify(drill: Drill, slow_link: None) -> None:
    """Speculative rounds and server-only streams (in flight at the edge for their whole length) while a
    replica is killed: rounds fail over with the context resent, streams resume on the other replica."""
    stream = {"path": "server-only", "max_tokens": 160, "ignore_eos": True}
    reference = {**_reference(drill), **{f"s:{p}": drill.send(_body(p, **stream)).token_ids for p in PROMPTS}}
    bodies = [b for p in PROMPTS * 2 for b in (_body(p), _body(p), _body(p, **stream))]
    outcomes, pid, fault_at = drill.load(bodies, concurrency=9, fault=drill.kill_replica_holding_sessions,
                                         fault_after_s=0.3)
    assert pid > 0, "no edge replica was seen holding a request in flight"
    for o in outcomes:
        key = f"s:{o.body['prompt']}" if o.body["path"] == "server-only" else str(o.body["prompt"])
        _check([o], {str(o.body["prompt"]): reference[key]})
    failed_over = sum(o.json.get("trace", {}).get("failovers", 0) for o in outcomes if o.ok)
    resent = sum(o.json.get("trace", {}).get("context_resends", 0) for o in outcomes if o.ok)
    refused = [f"{o.status} {o.json.get('error') or o.json or o.error}" for o in outcomes if not o.ok]
    assert len(refused) <= 2, f"most requests must fail over, not be refused: {refused}"
    # The killed replica held requests in flight: they went on on the other replica.
    assert failed_over + resent > 0, "the kill landed on live requests, yet none failed over"
    drill.wait_healthy({"EdgeVerifier": 2})
    recovery_s = time.monotonic() - fault_at
    drill.record("edge replica killed mid-verify and mid-stream (SIGKILL)", outcomes, recovery_s,
                 f"{failed_over} calls failed over, {resent} sessions resent their context; outputs identical")


def test_cloud_replica_killed_during_grounded_requests(drill: Drill) -> None:
    """Grounded requests while a cloud replica dies: retrieval fails over to the other replica, which holds the
    same knowledge base, so every answer equals the fault-free one token for token."""
    prompt = "How high do spring tides reach at the harbour?"
    # Beam search at the cloud, named: left to the router, a busy cloud makes it draft at the device instead, and
    # beam search's answer is not the greedy one.
    body = {"prompt": prompt, "path": "device-edge-cloud", "quality": "grounded", "generation": "beam",
            "beam_width": 2, "max_tokens": 24, "link_id": "drill-cloud"}
    reference = drill.send(body)
    assert reference.ok, (reference.status, reference.json)
    outcomes, _, fault_at = drill.load([body] * 8, concurrency=3,
                                       fault=lambda: drill.kill_replica("CloudService"), fault_after_s=0.4)
    _check(outcomes, {prompt: reference.token_ids})
    assert sum(o.ok for o in outcomes) >= 6
    drill.wait_healthy({"CloudService": 2})
    recovery_s = time.monotonic() - fault_at
    drill.record("cloud replica killed during grounded requests", outcomes, recovery_s,
                 "answers identical to the fault-free run")


def test_router_killed_decisions_go_on_and_state_survives(drill: Drill) -> None:
    drill.set_link("kept-link", 123_456.0, 33)
    before = drill.router()
    assert before["emulated_links"]["kept-link"]["bandwidth_bps"] == 123_456.0
    bodies = [{"prompt": p, "max_tokens": 16, "link_id": "drill"} for p in PROMPTS * 3]
    outcomes, _, fault_at = drill.load(bodies, concurrency=3, fault=lambda: drill.kill_replica("Router"),
                                       fault_after_s=0.1)
    _check(outcomes)
    refused = [(o.status, o.json.get("error") or o.error) for o in outcomes if not o.ok]
    assert len(refused) <= 1, f"decisions must go on without the router; refused: {refused}"
    drill.wait_healthy({"Router": 1})
    recovery_s = time.monotonic() - fault_at
    after = drill.router()
    assert after["emulated_links"]["kept-link"] == before["emulated_links"]["kept-link"]
    assert "drill" in after["links"], "the link estimates must survive the restart"
    by_ingress = sum("router unavailable" in str(o.json.get("route", {}).get("reason", "")) for o in outcomes)
    drill.record("router replica killed", outcomes, recovery_s,
                 f"{by_ingress} decisions taken by the ingress from the saved state; link settings and "
                 "estimates restored")


def test_link_outage_fast_request_finishes_on_device(drill: Drill) -> None:
    drill.set_link("outage", 2e6, 40)
    reference = drill.send({"prompt": PROMPTS[0], "max_tokens": 96, "path": "device-edge", "draft_len": 2,
                            "link_id": "outage"})
    assert reference.ok
    body = {"prompt": PROMPTS[0], "max_tokens": 96, "path": "device-edge", "draft_len": 2, "quality": "fast",
            "link_id": "outage"}
    outcomes, _, _ = drill.load([body], concurrency=1, fault=lambda: drill.set_link("outage", 0, 40),
                                fault_after_s=0.5)
    drill.set_link("outage", 2e6, 40)
    _check(outcomes)
    (o,) = outcomes
    assert o.ok, (o.status, o.json)
    trace = o.json["trace"]
    assert trace["fallback"] == "link outage", trace
    cut = trace["fallback_at"]
    assert 0 < cut < len(o.token_ids)
    assert o.token_ids[:cut] == reference.token_ids[:cut], "tokens verified before the outage are the large model's"
    estimate = drill.router()["links"]["outage"]["bandwidth_bps"]
    drill.record("link outage mid-generation, quality fast", outcomes, None,
                 f"fell back to the device after {cut} verified tokens; router's estimate then {estimate:.0f} B/s")


def test_link_outage_exact_request_waits_and_stays_exact(drill: Drill) -> None:
    drill.set_link("outage-exact", 2e6, 40)
    body = {"prompt": PROMPTS[1], "max_tokens": 64, "path": "device-edge", "draft_len": 2, "link_id": "outage-exact"}
    reference = drill.send(body)
    assert reference.ok

    def outage() -> None:
        drill.set_link("outage-exact", 0, 40)
        time.sleep(2.0)  # within the edge call's 5 s deadline
        drill.set_link("outage-exact", 2e6, 40)

    outcomes, _, _ = drill.load([body], concurrency=1, fault=outage, fault_after_s=0.4)
    _check(outcomes, {PROMPTS[1]: reference.token_ids})
    assert outcomes[0].ok and outcomes[0].json["trace"]["fallback"] == ""
    drill.record("link outage of 2 s mid-generation, quality exact", outcomes, 2.0,
                 "waited for the link; output identical")


def test_backpressure_is_503_with_retry_after(drill: Drill) -> None:
    """A burst past every queue: rejections are JSON 503s with Retry-After, not Serve's plain text."""
    bodies = [{"prompt": PROMPTS[i % 4], "max_tokens": 24, "path": "server-only", "link_id": "drill"}
              for i in range(60)]
    outcomes, _, _ = drill.load(bodies, concurrency=60)
    _check(outcomes)  # every answer a 200 or a 503/429 with Retry-After
    refused = [o for o in outcomes if o.retryable]
    assert refused, "60 requests at once fit in the edge's slots and queue: the burst refused nothing"
    by_router = sum("full" in str(o.json.get("error", {}).get("message", "")) for o in refused)
    drill.record("burst of 60 concurrent requests", outcomes, None,
                 f"{len(refused)} refused with Retry-After past the queues ({by_router} by the router's bounds on "
                 "the tiers' queues, the rest by Serve's own queue limits)")


PROXY_BACK_BOUND_S = 60.0


def test_proxy_restart(drill: Drill) -> None:
    """The HTTP proxy dies: requests in flight on it, and those sent while it is down, get no answer and are
    counted lost (a client sees a reset or a refused connection); Serve starts a new proxy, and a request sent
    after the kill is answered within PROXY_BACK_BOUND_S; every request after that is answered."""
    bodies = [{"prompt": PROMPTS[i % 4], "max_tokens": 16, "link_id": "drill"} for i in range(12)]
    outcomes, _, fault_at = drill.load(bodies, concurrency=2, fault=drill.kill_proxy, fault_after_s=0.5)
    for o in outcomes:  # no answer is allowed here (and counted lost); any answer keeps the contract
        assert o.status != 500 and o.elapsed_s < CLIENT_TIMEOUT_S - 1
        assert o.status == 0 or o.ok or o.retryable, (o.status, o.json)
    lost = [o for o in outcomes if o.lost]
    assert lost, "the proxy was killed under load, yet every request was answered: the kill did not land"
    assert all(o.started_at + o.elapsed_s >= fault_at - 0.1 for o in lost), "a request failed before the kill"
    # A client retrying after the kill: the first answer comes within the bound.
    drill.wait_until("the proxy answering again", lambda: drill.send(bodies[0]).ok, PROXY_BACK_BOUND_S)
    recovery_s = time.monotonic() - fault_at
    after = [drill.send(body) for body in bodies[:4]]
    assert all(o.ok for o in after), [(o.status, o.error) for o in after]
    drill.record("HTTP proxy killed", outcomes + after, recovery_s,
                 f"{len(lost)} requests in flight on the dying proxy or sent while it was down got no answer "
                 f"(counted lost); the first answer {recovery_s:.0f} s after the kill, all {len(after)} after it "
                 "answered")


def test_edge_raylet_killed_with_orphaned_workers(drill: Drill, slow_link: None) -> None:
    """The edge node's raylet dies and its workers live on, orphaned, still reporting load: the router must
    not count them, /readyz must say so, and no request may hang."""
    from aiflow_ray import cluster

    reference = _reference(drill)
    crashed_at = time.monotonic()
    cluster.node_command(drill.state_dir, "crash", "edge")
    exact: list[Outcome] = []
    fast: list[Outcome] = []
    down_s = None
    try:
        while time.monotonic() - crashed_at < 20:
            exact.append(drill.send(_body(PROMPTS[len(exact) % len(PROMPTS)])))
            fast.append(drill.send({"prompt": PROMPTS[len(fast) % len(PROMPTS)], "max_tokens": 24, "quality": "fast",
                                    "link_id": "drill"}))
            if down_s is None and not drill.ready():
                down_s = time.monotonic() - crashed_at
        _check(exact, reference)
        _check(fast)
        assert all(o.ok for o in fast), [(o.status, o.json) for o in fast]
        if down_s is None:
            drill.wait_until("/readyz reporting the edge down", lambda: not drill.ready(), 60)
            down_s = time.monotonic() - crashed_at
        # What a Kubernetes readiness probe asks (k8s/): still serving, so the pod keeps its traffic.
        serving = httpx.get(f"{drill.url}/readyz", params={"serving": "true"}, timeout=10)
        assert serving.status_code == 200 and serving.json()["status"] == "degraded", serving.text
    finally:
        cluster.node_command(drill.state_dir, "start", "edge")
    back_s = drill.wait_healthy({"EdgeVerifier": 2}, timeout_s=240)
    after = [drill.send(_body(p)) for p in PROMPTS]
    _check(after, reference)
    assert all(o.ok for o in after)
    drill.record("edge raylet killed (workers orphaned), node started again", exact + fast + after,
                 time.monotonic() - crashed_at,
                 f"exact: {sum(o.ok for o in exact)} answered, {sum(o.retryable for o in exact)} retryable 503; "
                 f"fast: all answered; /readyz 503 {down_s:.0f} s after the crash; back {back_s:.0f} s after the "
                 "restart")


def test_node_stopped_and_restarted(drill: Drill, slow_link: None) -> None:
    from aiflow_ray import cluster

    reference = _reference(drill)
    stopped_at = time.monotonic()
    cluster.node_command(drill.state_dir, "stop", "edge")
    try:
        exact = [drill.send(_body(p)) for p in PROMPTS[:2]]
        fast = [drill.send({"prompt": p, "max_tokens": 24, "quality": "fast", "link_id": "drill"}) for p in PROMPTS[:2]]
        _check(exact, reference)
        _check(fast)
        assert all(o.ok for o in fast), [(o.status, o.json) for o in fast]
        drill.wait_until("/readyz reporting the edge down", lambda: not drill.ready(), 30)
    finally:
        cluster.node_command(drill.state_dir, "start", "edge")
    recovery_s = drill.wait_healthy({"EdgeVerifier": 2}, timeout_s=240)
    after = [drill.send(_body(p)) for p in PROMPTS]
    _check(after, reference)
    assert all(o.ok for o in after)
    drill.record("edge node stopped, then started", exact + fast + after, time.monotonic() - stopped_at,
                 f"exact: {sum(o.ok for o in exact)} answered, {sum(o.retryable for o in exact)} retryable 503; "
                 f"fast: answered on the device; back {recovery_s:.0f} s after the restart")
