"""Session state: rollback, lost sessions, O(draft) uplink, and the sampled path."""

from __future__ import annotations

import numpy as np
import pytest

from aiflow_ray.config import GenerateOptions, LinkConfig, SamplingConfig
from aiflow_ray.engines.base import SessionNotFound
from aiflow_ray.network.link import DuplexLink
from aiflow_ray.network.wire import verify_request_size
from aiflow_ray.speculative.policy import make_policy
from aiflow_ray.tiers.device import InProcessTransport
from aiflow_ray.tiers.pipeline import Pipeline
from tests.conftest import PROMPTS

GREEDY = SamplingConfig()  # type: ignore[call-arg]
VIRTUAL_LINK = LinkConfig(virtual_time=True)  # type: ignore[call-arg]


def test_rollback_matches_fresh_session(tiny_pipeline: Pipeline) -> None:
    engine = tiny_pipeline.verifier_engine
    prompt = engine.encode_prompt(PROMPTS[2], chat=False)
    engine.open_session("a", prompt)
    first = engine.score("a", [7, 8, 9, 10], GREEDY).greedy_ids
    engine.append("a", [7, 8, 9, 10])
    engine.score("a", [11, 12], GREEDY)  # cache now holds prompt + 7..12
    engine.rollback("a", len(prompt) + 1)  # keep only token 7
    after = engine.score("a", [30, 31], GREEDY).greedy_ids
    engine.open_session("b", [*prompt, 7])
    fresh = engine.score("b", [30, 31], GREEDY).greedy_ids
    assert after == fresh
    engine.open_session("c", prompt)
    assert engine.score("c", [7, 8, 9, 10], GREEDY).greedy_ids == first
    for sid in "abc":
        engine.release(sid)
    with pytest.raises(SessionNotFound):
        engine.score("a", [], GREEDY)
    with pytest.raises(ValueError):
        engine.open_session("d", [])


def test_rollback_bounds(tiny_pipeline: Pipeline) -> None:
    engine = tiny_pipeline.verifier_engine
    engine.open_session("r", [1, 2, 3])
    with pytest.raises(ValueError):
        engine.rollback("r", 0)
    with pytest.raises(ValueError):
        engine.rollback("r", 4)
    engine.release("r")


def test_lost_session_gives_identical_output(tiny_pipeline: Pipeline) -> None:
    prompt = PROMPTS[4]
    ids = tiny_pipeline.drafter_engine.encode_prompt(prompt, chat=True)
    reference = tiny_pipeline.target_greedy(ids, 40)
    edge = tiny_pipeline.edge
    transport = InProcessTransport(edge, DuplexLink.from_config(VIRTUAL_LINK))

    rounds = [0]

    def lose_sessions(_emitted: list[int], _logprobs: object) -> None:
        rounds[0] += 1
        if rounds[0] in (2, 5):
            edge.drop_all_sessions()  # a verifier restart, or a request routed to another replica

    policy = make_policy(GenerateOptions(prompt=prompt, draft_len=3).draft_policy())
    result = tiny_pipeline.device.generate_speculative(ids, 40, GREEDY, policy, transport, on_round=lose_sessions)
    assert result.token_ids == reference
    assert result.trace.context_resends == 2
    assert edge.engine.num_sessions == 0  # released at the end


def test_uplink_carries_only_the_draft_after_the_first_round(tiny_pipeline: Pipeline) -> None:
    prompt = "word " * 200  # a long context: it must cross once, not every round
    opts = GenerateOptions(prompt=prompt, draft_len=4, max_new_tokens=24, link=VIRTUAL_LINK, chat=False)
    result = tiny_pipeline.run(opts)
    context_len = len(tiny_pipeline.drafter_engine.encode_prompt(prompt, chat=False))
    first_round_up = verify_request_size(result.trace.draft_lens[0], context_len=context_len)
    later_up = sum(verify_request_size(k) for k in result.trace.draft_lens[1:])
    release = 24  # header-only RELEASE message
    assert result.trace.bytes_up == first_round_up + later_up + release
    assert max(verify_request_size(k) for k in result.trace.draft_lens[1:]) <= verify_request_size(4)


def test_sampled_generation_is_seeded_and_reproducible(tiny_pipeline: Pipeline) -> None:
    sampling = SamplingConfig(temperature=0.8, seed=7)
    opts = GenerateOptions(prompt=PROMPTS[3], draft_len=4, max_new_tokens=24, sampling=sampling, link=VIRTUAL_LINK)
    first = tiny_pipeline.run(opts)
    second = tiny_pipeline.run(opts)
    assert first.token_ids == second.token_ids
    other = tiny_pipeline.run(opts.model_copy(update={"sampling": SamplingConfig(temperature=0.8, seed=8)}))
    assert other.token_ids != first.token_ids


def test_sampled_speculative_first_tokens_follow_target(tiny_pipeline: Pipeline) -> None:
    """End to end on the tiny pair: the first emitted token's frequencies match the verifier's p."""
    engine = tiny_pipeline.verifier_engine
    sampling = SamplingConfig(temperature=1.0, top_k=8, draft_top_k=4)
    ids = engine.encode_prompt(PROMPTS[7], chat=False)
    engine.open_session("p", ids)
    probs = engine.score("p", [], sampling).probs
    engine.release("p")
    assert probs is not None
    p = probs[0]
    trials = 1500
    counts = np.zeros_like(p)
    device = tiny_pipeline.device
    policy = make_policy(GenerateOptions(prompt="x", draft_len=2).draft_policy())
    transport = InProcessTransport(tiny_pipeline.edge, DuplexLink.from_config(VIRTUAL_LINK))
    for _ in range(trials):
        result = device.generate_speculative(ids, 2, sampling, policy, transport)
        counts[result.token_ids[0]] += 1
    freq = counts / trials
    support = p > 0
    assert support.sum() == 8
    assert not (freq[~support] > 0).any()
    # Chi-square over the 8 target tokens (7 dof): the 99.9th percentile is about 24.3.
    expected = p[support] * trials
    chi2 = (((counts[support] - expected) ** 2) / expected).sum()
    assert chi2 < 24.3
