from __future__ import annotations

import time

import numpy as np
import pytest

from aiflow_ray.config import LinkConfig
from aiflow_ray.network.estimators import LinkEstimator
from aiflow_ray.network.link import BandwidthTrace, DuplexLink, Link, RealClock, VirtualClock


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
