"""A device-edge request re-decided at a round boundary: when its rounds run slower than server-only was
predicted to, the edge replica that holds its session decodes the rest alone. Both paths give the verifier's
output, so the output is unchanged; only a header crosses for the switch, and a replica that lost the session
gets the prompt instead."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from aiflow_ray.config import GenerateOptions, LinkConfig, SamplingConfig
from aiflow_ray.network import wire
from aiflow_ray.network.link import DuplexLink
from aiflow_ray.routing.policy import Decision
from aiflow_ray.tiers.device import InProcessTransport, PathSwitch
from aiflow_ray.tiers.paths import DeviceSide, run_path
from aiflow_ray.tiers.pipeline import Pipeline
from aiflow_ray.tiers.server_only import generate_server_only
from tests.unit.test_servers import _opts, servers  # noqa: F401  (a fixture)

PROMPT = "Explain recursion to a child."
MAX_NEW = 40
VIRTUAL = LinkConfig(virtual_time=True)  # type: ignore[call-arg]


class CountingTransport(InProcessTransport):
    """The in-process edge behind the emulated link; optionally loses every session when a continuation
    arrives (as a replica restarted in between would)."""

    def __init__(self, pipeline: Pipeline, lose_sessions: bool = False) -> None:
        super().__init__(pipeline.edge, DuplexLink.from_config(VIRTUAL))
        self.lose_sessions = lose_sessions
        self.streams: list[tuple[int, bool]] = []  # (payload bytes, session bound)

    def stream(self, payload: bytes, session_bound: bool = False) -> Iterator[tuple[bytes, float]]:
        self.streams.append((len(payload), session_bound))
        if session_bound and self.lose_sessions:
            self.edge.drop_all_sessions()
        yield from super().stream(payload, session_bound)


def _run(pipeline: Pipeline, transport: CountingTransport, **kw: Any) -> Any:
    opts = GenerateOptions(prompt=PROMPT, path="device-edge", draft_len=3, max_new_tokens=MAX_NEW, link=VIRTUAL, **kw)
    return run_path(opts, DeviceSide(pipeline.device), transport)


@pytest.fixture(scope="module")
def reference(tiny_pipeline: Pipeline) -> list[int]:
    ids = tiny_pipeline.verifier_engine.encode_prompt(PROMPT, chat=True)
    return tiny_pipeline.target_greedy(ids, MAX_NEW)


def test_a_slow_speculative_request_goes_on_server_only_with_the_same_output(
        tiny_pipeline: Pipeline, reference: list[int]) -> None:
    transport = CountingTransport(tiny_pipeline)
    result = _run(tiny_pipeline, transport, switch_tpot_s=1e-9)  # any measured round is slower than this
    assert result.token_ids == reference
    trace = result.trace
    assert trace.path == "device-edge" and trace.rounds == 1 + PathSwitch(1.0).after_rounds
    assert trace.switched_at == len(trace.accepted) + sum(trace.accepted)
    assert "server-only predicted" in trace.switch_reason
    assert trace.num_tokens == len(reference) and trace.context_resends == 0
    # One GENERATE crossed, naming the session: a header and the lengths, not the context.
    ((sent_bytes, bound),) = transport.streams
    assert bound and sent_bytes < 48
    assert tiny_pipeline.verifier_engine.num_sessions == 0  # type: ignore[attr-defined]  # the stream ended it


def test_a_request_as_fast_as_predicted_stays_where_it_is(tiny_pipeline: Pipeline, reference: list[int]) -> None:
    transport = CountingTransport(tiny_pipeline)
    result = _run(tiny_pipeline, transport, switch_tpot_s=1e3)
    assert result.token_ids == reference
    assert result.trace.switched_at == -1 and not transport.streams
    unset = _run(tiny_pipeline, CountingTransport(tiny_pipeline))
    assert unset.trace.switched_at == -1 and unset.token_ids == reference


def test_a_replica_without_the_session_gets_the_prompt_and_the_output_is_unchanged(
        tiny_pipeline: Pipeline, reference: list[int]) -> None:
    transport = CountingTransport(tiny_pipeline, lose_sessions=True)
    result = _run(tiny_pipeline, transport, switch_tpot_s=1e-9)
    assert result.token_ids == reference
    assert result.trace.switched_at > 0 and result.trace.context_resends == 1
    (continued, _), (resent, bound) = transport.streams
    assert not bound and resent > continued + 4 * result.trace.switched_at  # the prompt and the tokens so far


def test_sampled_requests_switch_too_and_keep_their_seeded_stream(tiny_pipeline: Pipeline) -> None:
    """After the switch the edge samples with the session's own generator: a seeded request repeats itself,
    and its tokens after the switch come from the verifier (server-only's sampler), not the drafter."""
    sampling = SamplingConfig(temperature=0.8, seed=7)
    first = _run(tiny_pipeline, CountingTransport(tiny_pipeline), switch_tpot_s=1e-9, sampling=sampling)
    again = _run(tiny_pipeline, CountingTransport(tiny_pipeline), switch_tpot_s=1e-9, sampling=sampling)
    assert first.trace.switched_at > 0 and len(first.token_ids) == MAX_NEW
    assert first.token_ids == again.token_ids


def test_the_continuing_generate_is_a_header_and_refuses_a_prompt() -> None:
    header = wire.Header(wire.MsgType.GENERATE, bytes(range(16)), 0)
    request = wire.GenerateRequest(header, np.zeros(0, np.int32), 12, None, 3, continue_from=57)
    decoded = wire.decode(wire.encode_generate(request))
    assert isinstance(decoded, wire.GenerateRequest)
    assert (decoded.continue_from, decoded.max_new_tokens, decoded.min_tokens) == (57, 12, 3)
    assert len(decoded.prompt_ids) == 0
    with pytest.raises(wire.WireError):
        wire.encode_generate(wire.GenerateRequest(header, np.asarray([1, 2], np.int32), 12, None, continue_from=5))
    # A continuation with a sampling block is malformed: the session's own sampling applies.
    sampled = wire.encode_generate(wire.GenerateRequest(header, np.asarray([1], np.int32), 12,
                                                        SamplingConfig(temperature=0.5)))
    flags_at = 24
    forged = sampled[:flags_at] + bytes([sampled[flags_at] | 16]) + sampled[flags_at + 1:]
    with pytest.raises(wire.WireError, match="continuing"):
        wire.decode(forged)


def test_the_served_device_switches_through_the_edge_that_holds_the_session(servers: Any,  # noqa: F811
                                                                            tiny_pipeline: Pipeline) -> None:
    device, _edge, _router = servers
    opts = _opts("device-edge", max_new_tokens=MAX_NEW, prompt=PROMPT, switch_tpot_s=1e-9)
    switched = asyncio.run(device.generate(opts))
    assert switched.trace.switched_at > 0 and switched.trace.context_resends == 0
    assert switched.token_ids == generate_server_only(
        tiny_pipeline.verifier_engine.encode_prompt(PROMPT, chat=True), MAX_NEW, SamplingConfig(),
        CountingTransport(tiny_pipeline), tiny_pipeline.verifier_engine.decode).token_ids


def test_only_a_path_the_router_chose_is_re_decided() -> None:
    from aiflow_ray.api.app import Ingress
    from aiflow_ray.api.schemas import GenerateBody

    decision = Decision("device-edge", 4, "fastest", predicted_tpot_s={"device-edge": 0.02, "server-only": 0.03})
    assert Ingress._switch_tpot_s(GenerateBody(prompt="hi"), decision) == 0.03
    assert Ingress._switch_tpot_s(GenerateBody(prompt="hi", path="device-edge"), decision) is None
    assert Ingress._switch_tpot_s(GenerateBody(prompt="hi"), Decision("server-only", 0, "fastest")) is None
    assert Ingress._switch_tpot_s(GenerateBody(prompt="hi"), Decision("device-edge", 4, "no router")) is None
