"""The tier servers' glue with injected engines and fake handles (no Ray): paths, exactness, logprobs,
streams, refusals as values, the start-up tokenizer check, queue accounting and the cloud's answers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aiflow_ray.config import AppArgs, GenerateOptions, GroundingOptions, LinkConfig
from aiflow_ray.errors import CalibrationInterrupted, Refusal
from aiflow_ray.network import wire
from aiflow_ray.serve.cloud_server import CloudServer
from aiflow_ray.serve.common import QUIET_IDLE_S, QUIETER_BY_SHARE, RECALIBRATE_IDLE_S, CpuShare
from aiflow_ray.serve.device_server import DeviceDrafterServer
from aiflow_ray.serve.edge_server import EdgeVerifierServer
from aiflow_ray.tiers.pipeline import Pipeline
from aiflow_ray.tiers.results import StreamDelta, StreamDone, TierResult
from tests.conftest import PROMPTS
from tests.unit.fakes import FakeHandle

FAST_LINK = LinkConfig(bandwidth_bps=1e9, rtt_s=0.0)


class RecordingRouter:
    def __init__(self) -> None:
        self.reports: list[Any] = []
        self.loads: list[Any] = []

    def report_generation(self, report: Any) -> None:
        self.reports.append(report)

    def report_load(self, report: Any) -> None:
        self.loads.append(report)

    def emulated_link(self, _link_id: str) -> None:
        return None


def _args(tmp_path: Path) -> dict[str, Any]:
    return AppArgs(model_preset="tiny", link_probe={"enabled": False}, link=FAST_LINK,
                   kb={"path": str(tmp_path / "kb.sqlite"), "refresh_interval_s": 0.05}).model_dump(mode="json")


@pytest.fixture()
def servers(tiny_pipeline: Pipeline, tmp_path: Path) -> Any:
    router = RecordingRouter()
    edge = EdgeVerifierServer(_args(tmp_path), engine=tiny_pipeline.verifier_engine, router=FakeHandle(router),
                              replica_id=lambda: "edge-1")
    device = DeviceDrafterServer(_args(tmp_path), FakeHandle(edge), None, engine=tiny_pipeline.drafter_engine,
                                 router=FakeHandle(router))
    yield device, edge, router
    device.prober.stop()
    # Every path released what it held at the edge, through the glue's fire-and-forget release (given a
    # moment: fire-and-forget means the device does not wait for it).
    engine: Any = tiny_pipeline.verifier_engine
    deadline = time.monotonic() + 2.0
    while engine.num_sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.num_sessions == 0, f"sessions left at the edge: {sorted(engine._sessions)}"


def _opts(path: str, **kw: Any) -> GenerateOptions:
    return GenerateOptions(**{"prompt": PROMPTS[0], "path": path, "draft_len": 3, "max_new_tokens": 16,
                              "link": FAST_LINK, **kw})


def test_every_path_through_the_device_server_and_the_exactness_of_speculation(
        servers: Any, tiny_pipeline: Pipeline) -> None:
    device, _edge, router = servers
    out = {path: asyncio.run(device.generate(_opts(path))) for path in ("on-device", "device-edge", "server-only")}
    assert all(isinstance(r, TierResult) and r.trace.path == p for p, r in out.items())
    ids = tiny_pipeline.drafter_engine.encode_prompt(PROMPTS[0], chat=True)
    assert out["device-edge"].token_ids == out["server-only"].token_ids == tiny_pipeline.target_greedy(ids, 16)
    assert {r.prompt_tokens for r in out.values()} == {len(ids)}
    spec = next(r for r in router.reports if r.path == "device-edge")
    assert spec.drafted == sum(out["device-edge"].trace.draft_lens) and spec.link_id == "device-0"


def test_the_edge_files_each_forward_under_the_tokens_it_fed(servers: Any, tiny_pipeline: Pipeline) -> None:
    """The router's cost curve reads forwards by tokens fed: a session's first verify feeds the whole prompt
    (a prefill, filed as one), later ones the draft and one token; the calibration, min of three, goes apart
    so the router can let it replace what start-up contention measured."""
    device, edge, _router = servers
    assert [n for n, _ in edge.edge.calibration_samples] == [1, 4, 8, 128]
    assert edge.edge.calibrated_at is not None
    edge.edge.service_samples.clear()
    result = asyncio.run(device.generate(_opts("device-edge", draft_len=3)))
    prompt_tokens = len(tiny_pipeline.drafter_engine.encode_prompt(PROMPTS[0], chat=True))
    fed = [n for n, _ in edge.edge.service_samples]
    assert fed[0] == prompt_tokens + result.trace.draft_lens[0], (fed, prompt_tokens)
    assert fed[1:] == [k + 1 for k in result.trace.draft_lens[1:]][:len(fed) - 1]
    edge.edge.service_samples.clear()
    asyncio.run(device.generate(_opts("server-only")))
    assert [n for n, _ in edge.edge.service_samples][:2] == [prompt_tokens, 1]


def test_logprobs_agree_between_verified_drafts_and_the_verifier_alone(servers: Any) -> None:
    device, _edge, _router = servers
    spec, alone = (asyncio.run(device.generate(_opts(p, logprobs=2))) for p in ("device-edge", "server-only"))
    assert spec.token_ids == alone.token_ids and spec.logprobs and alone.logprobs
    assert len(spec.logprobs) == len(spec.token_ids)
    for a, b in zip(spec.logprobs, alone.logprobs, strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4) and len(a.top_logprobs) == 2


@pytest.mark.parametrize("interval_s", [0.0, 1.0])
def test_stream_events_add_up_to_the_whole_answer(servers: Any, interval_s: float) -> None:
    """With no interval, a chunk a round (or two, where a character is split); with one longer than the whole
    generation (the tiny pair decodes a token in about a millisecond), the first round alone, then everything
    held goes with the end."""
    device, _edge, _router = servers
    device.args = device.args.model_copy(update={"stream_interval_s": interval_s})

    async def collect() -> list[Any]:
        return [event async for event in device.generate_stream(_opts("device-edge"))]

    events = asyncio.run(collect())
    *deltas, done = events
    assert all(isinstance(e, StreamDelta) for e in deltas) and isinstance(done, StreamDone)
    whole = asyncio.run(device.generate(_opts("device-edge")))
    assert "".join(e.text for e in deltas) + done.text == whole.text
    assert [t for e in deltas for t in e.token_ids] + done.token_ids == whole.token_ids
    assert done.num_tokens == len(whole.token_ids)
    rounds = len(done.trace.draft_lens)  # a round whose last character is split goes out with the next one
    assert rounds > 2 and (len(deltas) >= rounds - 2 if interval_s == 0 else len(deltas) == 1)


def test_a_path_this_deployment_lacks_is_a_refusal_naming_the_field(servers: Any) -> None:
    device, _edge, _router = servers
    refused = asyncio.run(device.generate(_opts("device-edge-cloud", grounding=GroundingOptions())))
    assert isinstance(refused, Refusal) and refused.status == 400 and refused.field == "path"


def test_a_request_longer_than_the_context_is_a_400_naming_the_field(servers: Any, tiny_pipeline: Pipeline,
                                                                     tmp_path: Path) -> None:
    """Past the context, on every path and in streams: a 400 naming the prompt (or messages) when the input
    alone does not fit, max_tokens when the output it asks for does not; nothing reaches an engine."""
    _device, edge, router = servers
    device = DeviceDrafterServer({**_args(tmp_path), "max_context_tokens": 512}, FakeHandle(edge), None,
                                 engine=tiny_pipeline.drafter_engine, router=FakeHandle(router))
    long_prompt = " ".join(PROMPTS) * 40
    try:
        for path in ("on-device", "device-edge", "server-only"):
            refused = asyncio.run(device.generate(_opts(path, prompt=long_prompt)))
            assert isinstance(refused, Refusal) and (refused.status, refused.field) == (400, "prompt"), refused
            assert "512 tokens" in refused.message
            refused = asyncio.run(device.generate(_opts(path, max_new_tokens=500)))
            assert isinstance(refused, Refusal) and (refused.status, refused.field) == (400, "max_tokens"), refused
            assert isinstance(asyncio.run(device.generate(_opts(path, max_new_tokens=8))), TierResult)

        async def first_event(opts: GenerateOptions) -> Any:
            async for event in device.generate_stream(opts):
                return event
            return None

        chat = _opts("device-edge", chat=True, messages=({"role": "user", "content": long_prompt},))
        refused = asyncio.run(first_event(chat))
        assert isinstance(refused, Refusal) and (refused.status, refused.field) == (400, "messages"), refused
    finally:
        device.prober.stop()
    assert AppArgs(edge={"engine": "vllm", "vllm": {"max_model_len": 4096}}).context_limit_tokens() == 4096 - 65
    assert AppArgs().context_limit_tokens() == 32_768


def test_start_up_refuses_speculation_against_another_tokenizer(tiny_pipeline: Pipeline, tmp_path: Path) -> None:
    class OtherEdge:
        async def vocab_fingerprint(self) -> str:
            return "another tokenizer"

        async def vision(self) -> dict[str, str | None]:
            return {"spec": None, "encoder_digest": None}

    router = RecordingRouter()
    device = DeviceDrafterServer(_args(tmp_path), FakeHandle(OtherEdge()), None, engine=tiny_pipeline.drafter_engine,
                                 router=FakeHandle(router))
    try:
        device.startup_chores()
        assert device.tokenizer_checked and "tokenizer" in (device.tokenizer_error or "")
        refused = asyncio.run(device.generate(_opts("device-edge")))
        assert isinstance(refused, Refusal) and refused.status == 503 and "tokenizer" in refused.message
        assert isinstance(asyncio.run(device.generate(_opts("on-device"))), TierResult)
        assert not any(r.path == "calibration" for r in router.reports)  # never reported ready
    finally:
        device.prober.stop()


def test_the_device_reports_its_calibration_once_the_tokenizers_agree(servers: Any) -> None:
    device, _edge, router = servers
    device.prober.stop()  # the chores run from this test only (a tick under way ends within the sleep)
    time.sleep(0.2)
    device.startup_chores()
    assert device.tokenizer_error is None
    assert [r.path for r in router.reports].count("calibration") == 1
    assert router.reports[0].on_device_s_per_token > 0
    device.startup_chores()  # calibrated a moment ago: not again
    assert [r.path for r in router.reports].count("calibration") == 1
    # Idle a long while without drafting: re-timed, since the router learns the drafter only from drafting.
    device._calibrated_at = time.monotonic() - RECALIBRATE_IDLE_S - 1
    device.startup_chores()
    assert [r.path for r in router.reports].count("calibration") == 2
    device._calibrated_at = time.monotonic() - RECALIBRATE_IDLE_S - 1
    assert isinstance(asyncio.run(device.generate(_opts("on-device"))), TierResult)  # drafting is a measurement
    device.startup_chores()
    assert [r.path for r in router.reports].count("calibration") == 2


def test_an_idle_edge_re_times_itself_and_a_busy_one_does_not(servers: Any) -> None:
    """The start-up calibration shares the cores with every tier loading its model: an edge idle for a
    minute re-times itself (its samples go apart, for the router to replace what it held); a recent request
    or a recent calibration holds it off."""
    _device, edge, _router = servers

    async def health_then_wait() -> None:
        await edge.check_health()
        if edge._recalibration is not None:
            await edge._recalibration

    edge.edge.calibration_samples.clear()
    asyncio.run(health_then_wait())
    assert not edge.edge.calibration_samples  # calibrated at start-up, a moment ago
    edge.edge.calibrated_at = time.monotonic() - RECALIBRATE_IDLE_S - 1
    edge.load.last_active_at = time.monotonic() - 1  # a request just ended
    asyncio.run(health_then_wait())
    assert not edge.edge.calibration_samples
    edge.load.last_active_at = time.monotonic() - RECALIBRATE_IDLE_S - 1
    asyncio.run(health_then_wait())
    assert [n for n, _ in edge.edge.calibration_samples] == [1, 4, 8, 128]
    assert time.monotonic() - edge.edge.calibrated_at < 5


def test_cpu_share_sees_other_processes_and_not_its_own() -> None:
    meter = CpuShare()
    spin = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    burner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)  # the interpreter's start-up
        meter.others_share()
        time.sleep(1.0)
        busy = meter.others_share()
    finally:
        burner.wait(timeout=10)
    one_cpu = 1 / (CpuShare()._cpus)
    assert busy >= 0.8 * one_cpu, (busy, one_cpu)  # one of the node's CPUs, busy in another process
    # This process's own work is not counted. Another process of the host (a cluster a previous test left
    # shutting down) can keep a CPU busy for a second; a meter that counted this process would read at
    # least one CPU in every window, so the quietest of three windows decides.
    owns = []
    for _ in range(3):
        meter.others_share()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            pass
        owns.append(meter.others_share())
        if owns[-1] < busy - 0.5 * one_cpu:
            break
    assert min(owns) < busy - 0.5 * one_cpu, (owns, busy)


def test_a_calibration_timed_under_contention_is_redone_once_the_node_is_quiet(servers: Any) -> None:
    """At start-up every tier loads its model while the edge times its forwards: a calibration that shared the
    CPUs with other processes is redone at the first quiet moment, not a minute later."""
    _device, edge, _router = servers

    async def health_then_wait() -> None:
        await edge.check_health()
        if edge._recalibration is not None:
            await edge._recalibration

    others = {"share": 0.6}
    edge.cpu.others_share = lambda: others["share"]  # type: ignore[method-assign]
    edge.contended_share = 0.6
    edge.edge.calibrated_at = time.monotonic()
    edge.load.last_active_at = time.monotonic() - QUIET_IDLE_S - 1
    edge.edge.calibration_samples.clear()
    asyncio.run(health_then_wait())
    assert not edge.edge.calibration_samples  # the node is still busy
    others["share"] = 0.6 - QUIETER_BY_SHARE / 2
    asyncio.run(health_then_wait())
    assert not edge.edge.calibration_samples  # a little quieter is not enough
    others["share"] = 0.6 - QUIETER_BY_SHARE * 2
    asyncio.run(health_then_wait())
    assert [n for n, _ in edge.edge.calibration_samples] == [1, 4, 8, 128]  # much quieter: re-timed at once
    assert edge.contended_share == others["share"]  # the share while it was re-timed
    edge.edge.calibration_samples.clear()
    asyncio.run(health_then_wait())
    assert not edge.edge.calibration_samples  # no quieter than that: it stays


def test_the_edge_reports_requests_waiting_for_its_engine_as_queued(servers: Any, tiny_pipeline: Pipeline) -> None:
    _device, edge, router = servers
    session = wire.new_session_id()
    ids = tiny_pipeline.verifier_engine.encode_prompt(PROMPTS[1], chat=False)
    payload = wire.encode_verify(wire.VerifyRequest(wire.Header(wire.MsgType.VERIFY, session, 0), len(ids),
                                                    np.asarray([5, 6], np.int32),
                                                    np.asarray(ids, np.int32)))
    replies: list[bytes] = []
    with edge.gate._lock:  # a forward in progress
        worker = threading.Thread(target=lambda: replies.append(asyncio.run(edge.verify(payload))))
        worker.start()
        deadline = time.monotonic() + 10
        while edge.load.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (edge.load.queued, edge.load.ongoing) == (1, 0)
        report = edge.load.report([])
        assert report.queued == 1 and report.replica == "edge-1" and report.capacity == 4
    worker.join(timeout=30)
    assert isinstance(wire.decode(replies[0]), wire.VerifyResult) and edge.load.queued == edge.load.ongoing == 0
    asyncio.run(edge.release(wire.encode_release(wire.Release(wire.Header(wire.MsgType.RELEASE, session, 1)))))
    assert not edge.edge.engine.has_session(session.hex())
    assert router.loads and router.loads[0].tier == "edge"


def test_grounded_answers_through_the_cloud_server(tiny_pipeline: Pipeline, tmp_path: Path) -> None:
    router = RecordingRouter()
    cloud = CloudServer(_args(tmp_path), engine=tiny_pipeline.verifier_engine, router=FakeHandle(router),
                        replica_id=lambda: "cloud-1")
    docs = [{"source": "notes:raft", "title": "Raft", "text": "Raft elects a leader with randomized timeouts."},
            {"source": "notes:tcp", "title": "TCP", "text": "TCP retransmits lost segments after a timeout."}]
    assert asyncio.run(cloud.ingest({"documents": docs}))["added"] == 2
    edge = EdgeVerifierServer(_args(tmp_path), engine=tiny_pipeline.verifier_engine, router=FakeHandle(router),
                              replica_id=lambda: "edge-1")
    device = DeviceDrafterServer(_args(tmp_path), FakeHandle(edge), FakeHandle(cloud),
                                 engine=tiny_pipeline.drafter_engine, router=FakeHandle(router))
    try:
        deadline = time.monotonic() + 10
        while cloud.cloud.retriever.num_chunks < 2 and time.monotonic() < deadline:
            cloud.cloud.retriever.maybe_refresh()
            time.sleep(0.05)

        def grounded(**kw: Any) -> TierResult:
            opts = GenerateOptions(prompt="How does Raft pick a leader?", path="device-edge-cloud", draft_len=2,
                                   max_new_tokens=8, link=FAST_LINK, grounding=GroundingOptions(top_k=1, **kw))
            result = asyncio.run(device.generate(opts))
            assert isinstance(result, TierResult), result
            return result

        beam = grounded(beam_width=1)
        speculative = grounded(generation="speculative")
        assert beam.sources and beam.sources[0]["source"] == "notes:raft"
        assert speculative.token_ids == beam.token_ids  # greedy beam = exact speculative answer
        assert beam.trace.links["device-edge"]["bytes_up"] == len("How does Raft pick a leader?") + 8
    finally:
        device.prober.stop()


def test_retiming_waits_for_a_quiet_moment_then_for_a_much_quieter_node_or_a_long_idle() -> None:
    from aiflow_ray.serve.common import retime_due

    quieter, same = 0.6 - QUIETER_BY_SHARE * 2, 0.6 - QUIETER_BY_SHARE / 2
    assert not retime_due(QUIET_IDLE_S / 2, 1000.0, 0.6, quieter)  # busy a moment ago: never
    assert retime_due(QUIET_IDLE_S, QUIET_IDLE_S, 0.6, quieter)  # timed under contention, now much quieter
    assert not retime_due(QUIET_IDLE_S, QUIET_IDLE_S, 0.6, same)  # a little quieter is not enough
    assert not retime_due(RECALIBRATE_IDLE_S, RECALIBRATE_IDLE_S / 2, 0.6, same)  # re-timed recently
    assert retime_due(RECALIBRATE_IDLE_S, RECALIBRATE_IDLE_S, 0.6, same)  # idle and untimed a long while


def test_an_idle_edge_re_timing_gives_way_to_a_request(servers: Any) -> None:
    """A request admitted while the idle edge re-times stops the timing at the next forward: it waits for one
    forward, not for the whole timing, and nothing of the interrupted timing is recorded."""
    _device, edge, _router = servers
    edge.edge.calibration_samples.clear()
    calibrated_at = edge.edge.calibrated_at
    sessions = edge.edge.engine.num_sessions
    asked = {"n": 0}

    def arrives_after_two_forwards() -> bool:
        asked["n"] += 1
        return asked["n"] > 2

    with pytest.raises(CalibrationInterrupted):
        edge.edge.calibrate(stop=arrives_after_two_forwards)
    assert asked["n"] == 3 and not edge.edge.calibration_samples and edge.edge.calibrated_at == calibrated_at
    assert edge.edge.engine.num_sessions == sessions  # the scratch session is gone
    with edge.load.admitted():  # through the server: a request is already admitted when the re-timing starts
        asyncio.run(edge._recalibrate())
    assert not edge.edge.calibration_samples
    asyncio.run(edge._recalibrate())  # none admitted: it runs whole
    assert [n for n, _ in edge.edge.calibration_samples] == [1, 4, 8, 128]


def test_an_idle_device_re_timing_gives_way_to_a_request(servers: Any) -> None:
    device, _edge, _router = servers
    calibrated_at = device._calibrated_at
    asked = {"n": 0}

    def arrives_after_the_warm_up() -> bool:
        asked["n"] += 1
        return asked["n"] > 1

    with pytest.raises(CalibrationInterrupted):
        device._calibrate(stop=arrives_after_the_warm_up)
    assert asked["n"] == 2 and device._calibrated_at == calibrated_at
    report = device._calibrate(stop=lambda: False)  # and the device is free again: a whole timing runs
    assert report.on_device_s_per_token > 0 and device._calibrated_at != calibrated_at
