from __future__ import annotations

import asyncio
import math
import pickle
import threading
import time

import numpy as np
import pytest

from aiflow_ray.api.schemas import LinkUpdate
from aiflow_ray.config import LinkConfig
from aiflow_ray.network.estimators import MAX_BANDWIDTH_BPS, MIN_BANDWIDTH_BPS, LinkEstimator
from aiflow_ray.network.link import BandwidthTrace, DuplexLink, Link, LinkTimeout, RealClock, VirtualClock
from aiflow_ray.routing.messages import GenerationReport
from aiflow_ray.routing.router import RouterState
from aiflow_ray.units import parse_bandwidth_bps


@pytest.mark.parametrize(("num_bytes", "bandwidth_bps", "rtt_s"), [(50_000, 500e3, 0.04), (200_000, 2e6, 0.02)])
def test_real_link_delays_payloads_as_configured(num_bytes: int, bandwidth_bps: float, rtt_s: float) -> None:
    link = DuplexLink.from_config(LinkConfig(bandwidth_bps=bandwidth_bps, rtt_s=rtt_s))
    expected = rtt_s / 2 + num_bytes / bandwidth_bps
    started = time.perf_counter()
    reported = link.up.transfer(num_bytes)
    measured = time.perf_counter() - started
    assert reported == pytest.approx(expected, rel=1e-6)
    assert measured == pytest.approx(expected, rel=0.10)


def test_virtual_clock_adds_delay_without_waiting() -> None:
    link = DuplexLink.from_config(LinkConfig(bandwidth_bps=1000, rtt_s=1.0, virtual_time=True))
    started_real = time.perf_counter()
    started_virtual = link.clock.now()
    link.up.transfer(2000)  # 0.5 s latency + 2 s serialisation
    assert time.perf_counter() - started_real < 0.1
    assert link.clock.now() - started_virtual == pytest.approx(2.5, abs=0.01)


def test_step_trace_integrates_across_steps() -> None:
    trace = BandwidthTrace([(0.0, 1000.0), (1.0, 100.0)])
    assert trace.transmit_s(500, 0.0) == pytest.approx(0.5)
    # 1000 bytes in the first second, the other 100 at 100 B/s
    assert trace.transmit_s(1100, 0.0) == pytest.approx(2.0)
    assert trace.bandwidth_at(5.0) == 100.0


def test_csv_trace(tmp_path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("at_s,bandwidth_bps\n0,2000000\n10,500000\n")
    link = DuplexLink.from_config(LinkConfig(trace_csv=path, rtt_s=0.0))
    assert link.up.trace.bandwidth_at(11) == 500_000
    with pytest.raises(ValueError):
        LinkConfig(trace_csv=path, steps=({"at_s": 0, "bandwidth_bps": 1},))  # type: ignore[arg-type]


def test_link_queues_back_to_back_transfers() -> None:
    clock = VirtualClock()
    link = Link(BandwidthTrace.constant(1000.0), 0.0, clock)
    now = clock.now()
    first = link.schedule(1000, now)
    second = link.schedule(1000, now)
    assert second - now == pytest.approx(2.0) and first - now == pytest.approx(1.0)


@pytest.mark.parametrize("true_bps", [500e3, 1e6, 2e6])
def test_link_estimator_converges_to_true_bandwidth(true_bps: float) -> None:
    rng = np.random.default_rng(0)
    clock = VirtualClock()
    link = DuplexLink(Link(BandwidthTrace.constant(true_bps), 0.01, clock),
                      Link(BandwidthTrace.constant(true_bps), 0.01, clock), clock)
    estimator = LinkEstimator(prior_bandwidth_bps=50e3, prior_rtt_s=0.5)
    for _ in range(200):
        up, down = int(rng.integers(50, 60_000)), 40
        started = clock.now()
        link.up.transfer(up)
        link.down.transfer(down)
        jitter = float(rng.normal(0, 0.001))  # scheduling noise on a real host
        estimator.observe(up + down, clock.now() - started + jitter)
    est = estimator.estimate()
    assert est.bandwidth_bps == pytest.approx(true_bps, rel=0.10)
    assert est.rtt_s == pytest.approx(0.02, abs=0.003)


def test_link_estimator_tracks_a_bandwidth_drop() -> None:
    rng = np.random.default_rng(1)
    estimator = LinkEstimator()
    for bps in (2e6, 200e3):
        for _ in range(150):
            size = int(rng.integers(100, 40_000))
            estimator.observe(size, 0.02 + size / bps)
        assert estimator.estimate().bandwidth_bps == pytest.approx(bps, rel=0.10)


def test_real_clock_sleeps() -> None:
    clock = RealClock()
    started = clock.now()
    clock.sleep_until(started + 0.05)
    assert clock.now() - started >= 0.05


def test_probe_pairs_separate_rtt_from_bandwidth_where_equal_rounds_cannot() -> None:
    """~100-byte speculative rounds alone mistake a slow link for a long RTT; probe pairs do not."""
    from aiflow_ray.network.probe import probe_link
    from aiflow_ray.tiers.edge import answer_ping

    clock = VirtualClock()
    link = DuplexLink(Link(BandwidthTrace.constant(10e3), 0.001, clock),
                      Link(BandwidthTrace.constant(10e3), 0.001, clock), clock)

    def exchange(payload: bytes) -> bytes:
        link.up.transfer(len(payload))
        reply = answer_ping(payload)
        link.down.transfer(len(reply))
        return reply

    rounds_only, probed = LinkEstimator(), LinkEstimator()
    rng = np.random.default_rng(2)
    for i in range(12):
        size = int(rng.integers(95, 110))
        seconds = 0.002 + size / 10e3
        rounds_only.observe(size, seconds)
        probed.observe(size, seconds)
        if i % 3 == 0:
            small, big = probe_link(exchange, clock, padding_bytes=1024, seq=i)
            probed.observe_pair(small, big)
    assert rounds_only.estimate().bandwidth_bps > 5 * 10e3  # the blind spot the probes exist for
    assert probed.estimate().bandwidth_bps == pytest.approx(10e3, rel=0.1)
    assert probed.estimate().rtt_s == pytest.approx(0.002, abs=0.001)
    # A pair taken after the link recovers moves the estimate at once; two pairs outvote the past.
    fast_link = LinkEstimator()
    for bps in (10e3, 10e3, 10e3, 2e6, 2e6):
        fast_link.observe_pair((52, 0.002 + 52 / bps), (1076, 0.002 + 1076 / bps))
    assert fast_link.estimate().bandwidth_bps == pytest.approx(2e6, rel=0.01)


def _trained(with_pairs: bool, bps: float = 1e6, rtt_s: float = 0.02) -> LinkEstimator:
    """An estimator that has seen a steady link: rounds of 90-3000 bytes, and probe pairs if asked."""
    estimator = LinkEstimator()
    for i in range(30):
        size = 90 if i % 2 else 3000
        estimator.observe(size, rtt_s + size / bps)
        if with_pairs and i % 10 == 0:
            estimator.observe_pair((52, rtt_s + 52 / bps), (1076, rtt_s + 1076 / bps))
    assert estimator.estimate().bandwidth_bps == pytest.approx(bps, rel=0.1)
    return estimator


def test_estimate_stays_within_what_round_trips_can_measure() -> None:
    # A padded probe that came back faster than the bare one: a zero pair slope once read as 1e12 B/s.
    pair = LinkEstimator()
    pair.observe_pair((52, 0.0205), (1076, 0.0201))
    # Large rounds that happened to be quicker than small ones: a negative fitted slope.
    rounds = LinkEstimator()
    for _ in range(5):
        rounds.observe(100, 0.5)
        rounds.observe(20_000, 0.01)
    rounds.observe(100, math.nan)  # no measurement, not a poisoned fit
    for estimator in (pair, rounds):
        est = estimator.estimate()
        assert math.isfinite(est.bandwidth_bps) and math.isfinite(est.rtt_s)
        assert MIN_BANDWIDTH_BPS <= est.bandwidth_bps <= MAX_BANDWIDTH_BPS
    never = LinkEstimator()
    never.observe_outage(math.inf, 1)  # it never arrived
    assert never.estimate().bandwidth_bps == MIN_BANDWIDTH_BPS


@pytest.mark.parametrize("with_pairs", [False, True])
def test_round_trips_in_a_slow_spell_pull_the_estimate_down_at_once(with_pairs: bool) -> None:
    estimator = _trained(with_pairs)
    estimator.observe(100, 0.02 + 100 / 1e3)  # the link drops to 1 KB/s mid-request
    assert estimator.estimate().bandwidth_bps == pytest.approx(1e3, rel=0.1)
    assert estimator.in_slow_spell
    estimator.observe(3000, 0.02 + 3000 / 1e3)
    assert estimator.estimate().bandwidth_bps == pytest.approx(1e3, rel=0.1)
    estimator.observe(90, 0.02 + 90 / 1e6)  # back to normal: the spell's round trips left no trace
    est = estimator.estimate()
    assert est.bandwidth_bps == pytest.approx(1e6, rel=0.1) and est.rtt_s == pytest.approx(0.02, abs=0.005)


@pytest.mark.parametrize("recovery", ["round trips", "probe pair"])
def test_an_outage_drives_the_estimate_below_its_bound_until_the_link_answers(recovery: str) -> None:
    estimator = _trained(with_pairs=True)
    estimator.observe_outage(waited_s=1.0, num_bytes=2000)
    assert estimator.estimate().bandwidth_bps < 2000  # 2000 bytes did not arrive in 1 s
    assert estimator.base_estimate().bandwidth_bps == pytest.approx(1e6, rel=0.1)
    if recovery == "round trips":
        estimator.observe(90, 0.02 + 90 / 1e6)
        estimator.observe(3000, 0.02 + 3000 / 1e6)
    else:
        estimator.observe_pair((52, 0.02 + 52 / 1e6), (1076, 0.02 + 1076 / 1e6))
    assert estimator.estimate().bandwidth_bps == pytest.approx(1e6, rel=0.1)


def test_the_router_sees_an_outage_and_the_recovery() -> None:
    state = RouterState()
    normal = ((90, 0.02009), (3000, 0.023)) * 5
    state.report_generation(GenerationReport(link_id="phone", path="device-edge", link_samples=normal))
    before = state.inputs("phone").link.bandwidth_up_bps
    state.report_generation(GenerationReport(link_id="phone", path="device-edge", link_samples=normal[:2],
                                             link_outages=((500, 5.0),)))
    assert state.inputs("phone").link.bandwidth_up_bps < 100
    assert state.snapshot()["links"]["phone"]["bandwidth_bps"] < 100
    state.report_generation(GenerationReport(link_id="phone", path="device-edge", link_samples=normal[:2]))
    assert state.inputs("phone").link.bandwidth_up_bps == pytest.approx(before, rel=0.1)


def test_zero_bandwidth_is_an_outage_the_admin_api_can_set() -> None:
    assert LinkUpdate(bandwidth_bps=0).bandwidth_bps == 0.0
    assert parse_bandwidth_bps("0B/s", allow_zero=True) == parse_bandwidth_bps("0", allow_zero=True) == 0.0
    with pytest.raises(ValueError, match="positive"):
        parse_bandwidth_bps("0")  # a link configured to send at 0 is a mistake, not an outage
    with pytest.raises(ValueError):
        LinkUpdate(bandwidth_bps=-1)


def test_trace_with_zero_bandwidth_steps() -> None:
    trace = BandwidthTrace([(0.0, 1000.0), (1.0, 0.0), (3.0, 1000.0)])
    assert trace.transmit_s(1500, 0.0) == pytest.approx(3.5)  # nothing moves during the 2 s outage
    assert trace.capacity_bytes(0.5, 3.5) == pytest.approx(1000.0)
    assert BandwidthTrace([(0.0, 1000.0), (1.0, 0.0)]).transmit_s(1500, 0.0) == math.inf
    assert BandwidthTrace.constant(0.0).transmit_s(0, 0.0) == 0.0
    with pytest.raises(ValueError):
        BandwidthTrace.constant(-1.0)


def test_virtual_clock_replays_queued_transfers_as_before() -> None:
    clock = VirtualClock()
    link = Link(BandwidthTrace([(0.0, 1000.0), (1.0, 100.0)]), 0.05, clock)
    t0 = link.started_at
    assert link.schedule(500, t0) - t0 == pytest.approx(0.55)
    # Queued behind the first: 500 bytes by 1 s, the last 100 at 100 B/s.
    assert link.schedule(600, t0) - t0 == pytest.approx(2.05)
    assert link.stats.transfers == 2 and link.stats.bytes == 1100


def test_a_change_re_times_what_is_queued() -> None:
    clock = VirtualClock()
    link = Link(BandwidthTrace.constant(50.0), 0.0, clock)
    link.schedule(1000)  # 20 s at the outage-like rate
    link.set_trace(BandwidthTrace.constant(1e6))
    # Queued behind the first payload, which now goes at 1 MB/s: milliseconds, not 20 s.
    assert link.transfer(10) < 0.01


@pytest.mark.timeout(5)
def test_a_blocked_transfer_wakes_when_the_link_comes_back() -> None:
    link = Link(BandwidthTrace.constant(100.0), 0.0, RealClock())  # 2 KB would take 20 s
    changed_at: list[float] = []

    def recover() -> None:
        changed_at.append(time.perf_counter())
        link.set_trace(BandwidthTrace.constant(1e6))

    threading.Timer(0.2, recover).start()
    started = time.perf_counter()
    delay_s = link.transfer(2000)
    elapsed_s = time.perf_counter() - started
    # ~20 bytes before the change, the other ~1980 at 1 MB/s: 2 ms after it, not 20 s.
    assert delay_s == pytest.approx(changed_at[0] - started + 1980 / 1e6, abs=0.01)
    assert 0.19 < elapsed_s < 0.5 and elapsed_s == pytest.approx(delay_s, abs=0.02)


@pytest.mark.timeout(5)
def test_an_async_transfer_wakes_when_the_link_comes_back() -> None:
    link = Link(BandwidthTrace.constant(0.0), 0.0, RealClock())
    threading.Timer(0.1, link.set_trace, (BandwidthTrace.constant(1e6),)).start()
    started = time.perf_counter()
    asyncio.run(link.transfer_async(1000, timeout_s=2.0))
    assert 0.08 < time.perf_counter() - started < 0.3


@pytest.mark.timeout(5)
def test_zero_bandwidth_times_out_and_drops_the_payload() -> None:
    link = DuplexLink.from_config(LinkConfig(bandwidth_bps=1e6, rtt_s=0.0))
    link.set_conditions(0)
    started = time.perf_counter()
    with pytest.raises(LinkTimeout) as caught:
        link.up.transfer(100, timeout_s=0.2)
    assert time.perf_counter() - started == pytest.approx(0.2, abs=0.1)
    assert caught.value.num_bytes == 100 and caught.value.waited_s == pytest.approx(0.2, abs=0.1)
    assert isinstance(caught.value, TimeoutError) and link.up.stats.timeouts == 1
    restored = pickle.loads(pickle.dumps(caught.value))
    assert (restored.num_bytes, restored.waited_s) == (100, caught.value.waited_s)
    # The abandoned payload does not hold up the next one once the link is back.
    link.set_conditions(1e6)
    assert link.up.transfer(1000) == pytest.approx(1e-3, abs=1e-4)


def test_virtual_clock_outage_skips_to_the_deadline() -> None:
    clock = VirtualClock()
    link = Link(BandwidthTrace.constant(0.0), 0.0, clock)
    started = clock.now()
    with pytest.raises(LinkTimeout):
        link.transfer(100, timeout_s=5.0)
    assert clock.now() - started == pytest.approx(5.0, abs=0.01)
    with pytest.raises(LinkTimeout) as caught:  # no deadline and no recovery: it would wait forever
        link.transfer(100)
    assert caught.value.waited_s == math.inf
