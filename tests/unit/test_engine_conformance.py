"""One conformance suite for every engine behind the Engine protocol.

Pairs under test: the HF reference on the tiny fp32 pair (exact arithmetic: every comparison is equality),
llama.cpp on the real Qwen2.5-Coder 0.5B/1.5B Q4_K_M GGUF files, and vLLM (its CPU build here, `pytest -m
vllm`) on the tiny pair in fp32 (`make test`) and on the real weights (`make test-extended`). Neither
llama.cpp's block evaluation nor vLLM's bf16 kernels are bit-identical to one-token decoding, so with them two
greedy sequences may part only at a near-tie: where they first differ, the verifier's top two logits (one-
token decode) must lie within TIE_LOGITS of each other (docs/design.md section 8 measured block-vs-step logit
differences of 0.5-0.7).
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


@pytest.fixture(scope="module", params=[
    "hf-tiny", pytest.param("llama_cpp-real", marks=pytest.mark.real_model),
    pytest.param("vllm-tiny", marks=pytest.mark.vllm),
    # The real weights on vLLM: about two minutes to start and a minute a claim on this CPU.
    pytest.param("vllm-real", marks=[pytest.mark.real_model, pytest.mark.vllm, pytest.mark.extended])])
def pair(request: pytest.FixtureRequest, tiny_pipeline: Pipeline) -> Iterator[Pair]:
    if request.param == "hf-tiny":
        yield Pair("hf-tiny", tiny_pipeline.drafter_engine, tiny_pipeline.verifier_engine, exact=True)
        return
    if request.param.startswith("vllm-"):
        drafter, verifier = request.getfixturevalue("vllm_pair" if request.param == "vllm-tiny" else "vllm_real_pair")
        yield Pair(request.param, drafter, verifier, exact=False)
        return
    from aiflow_ray.engines.loader import load_engine

    # The verifier as the edge serves it: any thread may call it, concurrent scores share decodes.
    yield Pair("llama_cpp-real", load_engine("qwen2.5-coder-0.5b-instruct", engine="llama_cpp"),
               load_engine("qwen2.5-coder-1.5b-instruct", engine="llama_cpp", shared_decodes=True), exact=False)


def _step_logits(engine: Engine, ids: list[int]) -> np.ndarray:
    sid = "conformance-step"
    engine.open_session(sid, ids)
    try:
        out = engine.score(sid, [], SamplingConfig(), with_logprobs=True)
        assert out.logprobs is not None
        return out.logprobs[0]
    finally:
        engine.release(sid)


def _greedy_steps(engine: Engine, ids: list[int], n: int, sid: str = "conformance-greedy") -> list[int]:
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


def test_text_only_engines_refuse_images(pair: Pair) -> None:
    """A text model given an image refuses it (the API turns that into a 400 naming the part), and keeps no
    half-open session. Vision engines: tests/unit/test_engine_conformance_images.py."""
    from aiflow_ray.engines.base import ImageInput, ImagesNotSupported

    engine = pair.verifier
    assert engine.vision is None
    ids = engine.encode_prompt(PROMPTS[0], chat=True)
    with pytest.raises(ImagesNotSupported):
        engine.open_session("img", ids, [ImageInput(tiles=np.zeros((1, 28, 28, 3), np.uint8))])
    assert not engine.has_session("img")


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


def test_sampled_verification_follows_the_target(pair: Pair) -> None:
    """Sampled speculative output follows the target distribution p, in two parts. (1) The engine's p at
    every draft position, from one block score, is the target's distribution after that prefix decoded
    alone (temperature and top-k applied). (2) The edge's rejection sampling over that p and the drafter's
    q emits tokens distributed as p (chi-square over many draws with the real rows)."""
    from aiflow_ray.speculative.sampling import target_probs
    from aiflow_ray.speculative.verify import verify_sampled

    ids = pair.verifier.encode_prompt(PROMPTS[4], chat=False)
    pair.drafter.open_session("sd", ids)
    pair.verifier.open_session("sv", ids)
    try:
        draft = pair.drafter.draft("sd", 2, SAMPLED, np.random.default_rng(1))
        block = pair.verifier.score("sv", draft.token_ids, SAMPLED).probs
    finally:
        pair.drafter.release("sd")
        pair.verifier.release("sv")
    assert block is not None and draft.q_ids is not None and draft.q_probs is not None
    for i in range(len(draft.token_ids) + 1):
        alone = target_probs(_step_logits(pair.verifier, ids + draft.token_ids[:i])[None, :], SAMPLED)[0]
        assert np.count_nonzero(block[i]) <= SAMPLED.top_k
        total_variation = 0.5 * np.abs(block[i] - alone).sum()
        assert total_variation < (1e-5 if pair.exact else 0.1), f"{pair.name}: position {i} TV {total_variation:.3f}"
    # The first emitted token follows p at position 0: each draw drafts its token from the drafter's q, as a
    # device does, and the edge accepts it or draws the correction (row 1 only matters for a bonus token).
    rng = np.random.default_rng(7)
    draws = 20_000
    # The draws only touch tokens where p or q has mass: on those columns alone (a real vocabulary is 152k
    # wide) the same sampling runs many times faster, with the same arithmetic.
    cols = np.union1d(np.union1d(np.flatnonzero(block[0]), np.flatnonzero(block[1])), draft.q_ids[0])
    rows = block[:2][:, cols]
    q_ids, q_probs = np.searchsorted(cols, draft.q_ids[:1]), draft.q_probs[:1]
    counts = np.zeros(len(cols))
    for _ in range(draws):
        token = int(rng.choice(q_ids[0], p=q_probs[0]))
        accepted, correction = verify_sampled([token], q_ids, q_probs, rows, rng)
        counts[token if accepted else correction] += 1
    support = rows[0] > 1e-3
    expected = rows[0][support] * draws
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    assert chi2 < 50.0, f"{pair.name}: chi-square {chi2:.1f} over {support.sum()} tokens"


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[3]])
def test_speculative_greedy_equals_the_target_alone(pair: Pair, prompt: str) -> None:
    pipeline = Pipeline(pair.drafter, pair.verifier)
    ids = pair.verifier.encode_prompt(prompt, chat=True)
    reference = pipeline.target_greedy(ids, 24)
    for k in (1, 4):
        opts = GenerateOptions(prompt=prompt, path="device-edge", draft_len=k, max_new_tokens=24, link=FAST_LINK)
        assert_same_or_near_tie(pair, ids, pipeline.run(opts).token_ids, reference)


def test_many_sessions_share_the_engine(pair: Pair) -> None:
    """Ten live sessions: each scores again as it did first, its KV kept beside the others' (a quantized
    engine rescoring on cached KV may part only at a near-tie). llama.cpp's evictions: the test below."""
    engine = pair.verifier
    prompts = [engine.encode_prompt(p, chat=False) for p in PROMPTS[:10]]
    first = []
    for i, ids in enumerate(prompts):
        engine.open_session(f"m{i}", ids)
        out = engine.score(f"m{i}", [], GREEDY, with_logprobs=True)
        assert out.logprobs is not None
        first.append((out.greedy_ids, out.logprobs[0]))
    try:
        for i, (greedy, row) in enumerate(first):
            again = engine.score(f"m{i}", [], GREEDY).greedy_ids
            top2 = np.sort(row)[-2:]
            assert again == greedy or (not pair.exact and top2[1] - top2[0] < TIE_LOGITS), (
                f"session m{i}: {again} after {greedy} (top-2 gap {top2[1] - top2[0]:.2f})")
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


@pytest.mark.real_model
def test_llama_cpp_evicts_the_least_recent_kv_and_recomputes_it_exactly() -> None:
    """The llama.cpp pool runs out of sequences or of cells: the least recently used other session loses its
    KV (not its ids) and scores as before when it comes back; one session longer than the pool is refused."""
    from aiflow_ray.engines.llama_cpp import KvCacheFull, LlamaCppEngine
    from aiflow_ray.engines.loader import resolve_gguf

    engine = LlamaCppEngine(resolve_gguf("qwen2.5-coder-0.5b-instruct"), name="evictions", max_sequences=3,
                            kv_tokens=512)
    resident = engine._sessions  # white-box: which sessions hold a sequence

    def scores(sids: list[str]) -> list[list[int]]:
        return [engine.score(sid, [], GREEDY).greedy_ids for sid in sids]

    short = [engine.encode_prompt(p, chat=False) for p in PROMPTS[:4]]
    for i, ids in enumerate(short):  # four sessions, three sequences
        engine.open_session(f"s{i}", ids)
    first = scores([f"s{i}" for i in range(4)])
    assert resident["s0"].seq is None and all(resident[f"s{i}"].seq is not None for i in (1, 2, 3))
    assert scores(["s0"]) == first[:1] and resident["s1"].seq is None, "s1 was the least recently used"
    assert scores([f"s{i}" for i in range(4)]) == first
    for i in range(4):
        engine.release(f"s{i}")

    long = [engine.encode_prompt(" ".join(PROMPTS[i:] + PROMPTS[:i]) * 5, chat=False)[:200] for i in range(3)]
    for i, ids in enumerate(long):  # three sequences, but 600 tokens in 512 cells
        engine.open_session(f"l{i}", ids)
    first = scores(["l0", "l1", "l2"])
    assert resident["l0"].seq is None, "out of cells, the least recently used session made room"
    assert scores(["l0", "l1", "l2"]) == first
    engine.open_session("huge", long[0] * 3)
    with pytest.raises(KvCacheFull):
        engine.score("huge", [], GREEDY)


@pytest.mark.real_model
def test_llama_cpp_sessions_share_prefixes_and_score_as_a_cold_prefill() -> None:
    """A new session takes the longest prefix a resident sequence holds (a released one's, kept as a donor, or a
    live one's) and feeds only the rest; its scores are those of an engine that prefills everything."""
    from aiflow_ray.engines.llama_cpp import LlamaCppEngine
    from aiflow_ray.engines.loader import resolve_gguf

    gguf = resolve_gguf("qwen2.5-coder-0.5b-instruct")
    engine = LlamaCppEngine(gguf, name="shared", max_sequences=4, kv_tokens=1024)
    cold = LlamaCppEngine(gguf, name="cold", max_sequences=4, kv_tokens=1024)
    cold.share_prefixes = False
    fed: list[int] = []
    decode = engine._decode
    engine._decode = lambda feeds, *a, **kw: (fed.append(sum(len(t) for _, t, _ in feeds)), decode(feeds, *a, **kw))[1]

    def check(sid: str, ids: list[int], draft: list[int], expect_fed: int) -> None:
        fed.clear()
        engine.open_session(sid, ids)
        cold.open_session(sid, ids)
        got = engine.score(sid, draft, GREEDY, with_logprobs=True)
        want = cold.score(sid, draft, GREEDY, with_logprobs=True)
        assert sum(fed) == expect_fed
        assert got.greedy_ids == want.greedy_ids
        assert got.logprobs is not None and want.logprobs is not None
        assert np.abs(got.logprobs - want.logprobs).max() < 1e-3
        cold.release(sid)

    first = engine.encode_prompt(PROMPTS[0], chat=True)
    second = engine.encode_prompt(PROMPTS[1], chat=True)
    system = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert system >= 10, "the chat template's system turn is the shared prefix"
    check("a", first, [], len(first))  # nothing resident yet
    engine.release("a")
    draft = engine.encode_prompt(" return", chat=False)
    check("b", second, draft, len(second) + len(draft) - system)  # from the released "a"
    # The next turn of "b"'s conversation while "b" is live: all of "b" that is still held comes from it.
    turn = second + draft + engine.encode_prompt("<|im_end|>\n<|im_start|>user\nAnd in Rust?", chat=False)
    check("c", turn, [], len(turn) - len(second + draft))
    assert len(engine._retained) == 1
    for sid in ("b", "c"):
        engine.release(sid)
    assert len(engine._retained) == 2, "at most half the sequences kept for prefixes"
    engine.claim_all_sequences()
    assert not engine._retained
    check("d", first, [], len(first))


@pytest.mark.real_model
def test_llama_cpp_served_engine_shares_decodes_among_concurrent_streams() -> None:
    """The llama.cpp engine of the edge and the device (any thread may call it) runs the forwards that sessions
    ask for at once in shared decodes, as llama-server's slots do: four streams decoding together take about a
    quarter of the decodes, and each stream's greedy tokens are those of decoding it alone, or part from them only
    at a near-tie (the kernels' sums differ with a decode's width in the last bits). A call whose session is gone
    fails alone; a draft's steps take the same decodes."""
    import threading

    from aiflow_ray.engines.llama_cpp import LlamaCppEngine
    from aiflow_ray.engines.llama_cpp_batch import BatchingLlamaCppEngine, _Call
    from aiflow_ray.engines.loader import load_engine, resolve_gguf

    gguf = resolve_gguf("qwen2.5-coder-0.5b-instruct")
    engine = load_engine("qwen2.5-coder-0.5b-instruct", engine="llama_cpp", shared_decodes=True)
    assert isinstance(engine, BatchingLlamaCppEngine) and engine.concurrent
    alone = LlamaCppEngine(gguf, name="alone", max_sequences=4, kv_tokens=2048)
    prompts = [engine.encode_prompt(p, chat=True) for p in PROMPTS[:4]]
    want = [_greedy_steps(alone, ids, 16) for ids in prompts]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def stream(i: int) -> None:
        try:
            got[i] = _greedy_steps(engine, prompts[i], 16, sid=f"stream-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(got) == 4
    assert engine.calls >= 2.5 * engine.decodes, f"{engine.calls} scores in {engine.decodes} decodes"
    reference = Pair("llama_cpp-alone", alone, alone, exact=False)
    for i, ids in enumerate(prompts):
        assert_same_or_near_tie(reference, ids, got[i], want[i])
    assert engine.num_sessions == 0 and not engine._streams

    # One shared decode with a call whose session was released: that call alone fails.
    for sid, ids in (("a", prompts[0]), ("b", prompts[1])):
        engine.open_session(sid, ids)
    calls = [_Call("a", [], 1), _Call("gone", [], 1), _Call("b", [7, 8], 3)]
    engine._run(calls)
    assert isinstance(calls[1].error, SessionNotFound)
    assert calls[0].logits is not None and calls[2].logits is not None and calls[2].logits.shape[0] == 3
    assert_same_or_near_tie(reference, prompts[0], [int(np.argmax(calls[0].logits[0]))], want[0][:1])
    assert calls[0].shared_tokens and calls[2].shared_tokens == 0  # the shared decode is counted once

    # A device's drafts go through the same decodes: greedy drafts are the engine's own greedy steps.
    engine.release("b")
    drafted = engine.draft("a", 4, GREEDY).token_ids
    assert_same_or_near_tie(reference, prompts[0], drafted, want[0][:4])
