"""One conformance suite for every engine behind the Engine protocol.

Pairs under test: the HF reference on the tiny fp32 pair (exact arithmetic: every comparison is
equality), and llama.cpp on the real Qwen2.5-Coder 0.5B/1.5B Q4_K_M GGUF files. llama.cpp's block
evaluation is not bit-identical to one-token decoding, so with it two greedy sequences may part only
at a near-tie: where they first differ, the verifier's top two logits (one-token decode) must lie
within TIE_LOGITS of each other (ARCHITECTURE.md section 8 measured block-vs-step logit differences
of 0.5-0.7).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from aiflow_ray.config import GenerateOptions, LinkConfig, SamplingConfig
from aiflow_ray.engines.base import Engine, SessionNotFound
from aiflow_ray.tiers.pipeline import Pipeline
from tests.conftest import PROMPTS

GREEDY = SamplingConfig()
SAMPLED = SamplingConfig(temperature=0.8, top_k=20, draft_top_k=8, seed=3)
TIE_LOGITS = 1.0
FAST_LINK = LinkConfig(bandwidth_bps=1e9, rtt_s=0.0, virtual_time=True)


@dataclass
class Pair:
    name: str
    drafter: Engine
    verifier: Engine
    exact: bool  # exact arithmetic: block = step and speculative = target, with no tolerance


@pytest.fixture(scope="module", params=["hf-tiny", pytest.param("llama_cpp-real", marks=pytest.mark.real_model)])
def pair(request: pytest.FixtureRequest, tiny_pipeline: Pipeline) -> Iterator[Pair]:
    if request.param == "hf-tiny":
        yield Pair("hf-tiny", tiny_pipeline.drafter_engine, tiny_pipeline.verifier_engine, exact=True)
        return
    from aiflow_ray.engines.loader import load_engine

    yield Pair("llama_cpp-real", load_engine("qwen2.5-coder-0.5b-instruct", engine="llama_cpp"),
               load_engine("qwen2.5-coder-1.5b-instruct", engine="llama_cpp"), exact=False)


def _step_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    sid = "conformance-step"
    engine.open_session(sid, ids)
    try:
        out = engine.score(sid, [], SamplingConfig(), with_logprobs=True)
        assert out.logprobs is not None
        return out.logprobs[0]
    finally:
        engine.release(sid)


def _greedy_steps(engine: Engine, ids: list[int], n: int) -> list[int]:
    sid = "conformance-greedy"
    engine.open_session(sid, ids)
    out: list[int] = []
    try:
        for _ in range(n):
            greedy = engine.score(sid, [], GREEDY).greedy_ids
            assert greedy is not None
            out.append(greedy[0])
            engine.append(sid, greedy[:1])
    finally:
        engine.release(sid)
    return out


def assert_same_or_near_tie(pair: Pair, prompt_ids: list[int], got: list[int], want: list[int]) -> None:
    if pair.exact:
        assert got == want
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    if first is None:
        assert got[: len(want)] == want[: len(got)]
        return
    row = _step_logits(pair.verifier, prompt_ids + want[:first])
    top2 = np.sort(row)[-2:]
    assert top2[1] - top2[0] < TIE_LOGITS, f"{pair.name}: parted at token {first} without a near-tie " \
                                           f"(top-2 gap {top2[1] - top2[0]:.2f})"


def test_sessions_append_rollback_and_release(pair: Pair) -> None:
    engine = pair.verifier
    ids = engine.encode_prompt(PROMPTS[0], chat=True)
    engine.open_session("s", ids)
    assert engine.has_session("s") and engine.session_length("s") == len(ids)
    engine.append("s", [ids[-1], ids[-2]])
    assert engine.session_tokens("s") == [*ids, ids[-1], ids[-2]]
    engine.rollback("s", len(ids))
    assert engine.session_tokens("s") == ids
    with pytest.raises(ValueError):
        engine.rollback("s", len(ids) + 5)
    engine.release("s")
    assert not engine.has_session("s")
    with pytest.raises(SessionNotFound):
        engine.session_length("s")
    with pytest.raises(SessionNotFound):
        engine.score("s", [], GREEDY)


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_block_verify_matches_step_by_step_decode(pair: Pair, prompt: str) -> None:
    """score(draft) in one forward = the target's choice after each draft prefix, decoded one by one."""
    engine = pair.verifier
    ids = engine.encode_prompt(prompt, chat=True)
    reference = _greedy_steps(engine, ids, 8)
    draft = [*reference[:3], reference[3] ^ 1, *reference[4:7]]  # a rejection at position 4
    engine.open_session("b", ids)
    try:
        block = engine.score("b", draft, GREEDY).greedy_ids
    finally:
        engine.release("b")
    assert block is not None and len(block) == len(draft) + 1
    assert_same_or_near_tie(pair, ids, block[:4], reference[:4])


def test_rollback_then_score_equals_a_fresh_session(pair: Pair) -> None:
    engine = pair.verifier
    ids = engine.encode_prompt(PROMPTS[1], chat=True)
    engine.open_session("r", ids)
    engine.open_session("fresh", ids)
    try:
        engine.score("r", [11, 12, 13, 14], GREEDY)  # computed, never committed
        engine.append("r", [21])
        engine.score("r", [22, 23], GREEDY)
        engine.rollback("r", len(ids))
        engine.append("r", [31, 32])
        engine.append("fresh", [31, 32])
        a = engine.score("r", [33], SamplingConfig(), with_logprobs=True).logprobs
        b = engine.score("fresh", [33], SamplingConfig(), with_logprobs=True).logprobs
        assert a is not None and b is not None
        if pair.exact:
            np.testing.assert_allclose(a, b, atol=1e-5)
        else:  # within the block-vs-step noise of quantized kernels, over the tokens that carry mass
            mass = (a > np.log(1e-4)) | (b > np.log(1e-4))
            assert np.abs(a - b)[mass].max() < TIE_LOGITS
    finally:
        engine.release("r")
        engine.release("fresh")


def test_distributions_are_normalised(pair: Pair) -> None:
    ids = pair.drafter.encode_prompt(PROMPTS[2], chat=True)
    pair.drafter.open_session("d", ids)
    pair.verifier.open_session("v", ids)
    try:
        draft = pair.drafter.draft("d", 3, SAMPLED, np.random.default_rng(0))
        assert len(draft.token_ids) == 3 and draft.q_ids is not None and draft.q_probs is not None
        assert draft.q_ids.shape == draft.q_probs.shape == (3, SAMPLED.draft_top_k)
        np.testing.assert_allclose(draft.q_probs.sum(axis=-1), 1.0, atol=1e-6)
        assert all(t in row for t, row in zip(draft.token_ids, draft.q_ids, strict=True))
        scores = pair.verifier.score("v", draft.token_ids, SAMPLED, with_logprobs=True)
        assert scores.probs is not None and scores.probs.shape[0] == 4
        np.testing.assert_allclose(scores.probs.sum(axis=-1), 1.0, atol=1e-6)
        assert scores.logprobs is not None
        np.testing.assert_allclose(np.exp(scores.logprobs).sum(axis=-1), 1.0, atol=1e-3)
    finally:
        pair.drafter.release("d")
        pair.verifier.release("v")


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[3]])
def test_speculative_greedy_equals_the_target_alone(pair: Pair, prompt: str) -> None:
    pipeline = Pipeline(pair.drafter, pair.verifier)
    ids = pair.verifier.encode_prompt(prompt, chat=True)
    reference = pipeline.target_greedy(ids, 24)
    for k in (1, 4):
        opts = GenerateOptions(prompt=prompt, path="device-edge", draft_len=k, max_new_tokens=24, link=FAST_LINK)
        assert_same_or_near_tie(pair, ids, pipeline.run(opts).token_ids, reference)


def test_many_sessions_share_the_engine(pair: Pair) -> None:
    """More live sessions than the engine keeps KV for: each still scores as if it were alone."""
    engine = pair.verifier
    prompts = [engine.encode_prompt(p, chat=False) for p in PROMPTS[:10]]
    first = []
    for i, ids in enumerate(prompts):
        engine.open_session(f"m{i}", ids)
        first.append(engine.score(f"m{i}", [], GREEDY).greedy_ids)
    try:
        again = [engine.score(f"m{i}", [], GREEDY).greedy_ids for i in range(len(prompts))]
        assert again == first
    finally:
        for i in range(len(prompts)):
            engine.release(f"m{i}")


@pytest.mark.real_model
@pytest.mark.parametrize("model", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_the_ggufs_own_tokenizer_agrees_with_the_hf_tokenizer(model: str) -> None:
    """Only ids cross between tiers, so a GGUF runtime and an HF tokenizer must encode alike: code,
    Unicode, special tokens and the chat template (the probe set of the fingerprint, and more)."""
    from transformers import AutoTokenizer

    from aiflow_ray.engines.base import PROBE_CHAT, PROBE_TEXTS, tokenizer_fingerprint
    from aiflow_ray.engines.hf import encode_with_tokenizer
    from aiflow_ray.engines.loader import load_engine, resolve_model_path

    hf = AutoTokenizer.from_pretrained(str(resolve_model_path(model)))
    gguf = load_engine(model, engine="llama_cpp")
    for text in (*PROBE_TEXTS, *PROMPTS):
        assert gguf.encode_prompt(text, False) == encode_with_tokenizer(hf, text, False), text
        assert gguf.encode_prompt(text, True) == encode_with_tokenizer(hf, text, True), text
    assert gguf.encode_prompt(PROBE_CHAT, True) == encode_with_tokenizer(hf, PROBE_CHAT, True)
    assert gguf.vocab_fingerprint() == tokenizer_fingerprint(lambda p, c: encode_with_tokenizer(hf, p, c))
    ids = encode_with_tokenizer(hf, PROBE_TEXTS[2], False)
    assert gguf.decode(ids) == hf.decode(ids, skip_special_tokens=True)
