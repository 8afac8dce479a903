"""Beam search on the cloud's large model, and the grounded prompt (tiny models, real generation)."""

from __future__ import annotations

import pytest

from aiflow_ray.config import GenerateOptions, LinkConfig
from aiflow_ray.engines.hf import beam_search
from aiflow_ray.rag.prompting import MAX_CONTEXT_CHARS, grounded_messages
from aiflow_ray.tiers.pipeline import Pipeline

LONG_CONTEXT = ("\n".join(f"def helper_{i}(x):\n    return x * {i} + {i % 7}" for i in range(40))
                + "\nWhat is helper_7(2)?")
PROMPTS = ["def fibonacci(n):", "The mitochondria is", "class Stack:\n    def __init__(self):"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_beam_width_one_is_greedy_and_wider_beams_score_at_least_as_well(tiny_pipeline: Pipeline,
                                                                         prompt: str) -> None:
    engine = tiny_pipeline.verifier_engine
    ids = engine.encode_prompt(prompt, True)
    server_only = tiny_pipeline.run(GenerateOptions(prompt=prompt, path="server-only", max_new_tokens=12,
                                                    link=LinkConfig(virtual_time=True)))
    one = beam_search(engine, ids, beam_width=1, max_new_tokens=12)
    assert one.token_ids == server_only.token_ids
    for width in (2, 4, 8):
        wide = beam_search(engine, ids, beam_width=width, max_new_tokens=12, length_penalty=0.0)
        # With no length penalty the objective is the sequence log-probability itself.
        assert wide.sum_logprob >= one.sum_logprob - 1e-5


def test_grounded_prompt_numbers_passages_and_bounds_the_context() -> None:
    hits = [{"source": f"doc:{i}", "text": f"passage {i} " + "x" * 1500} for i in range(10)]
    messages, used = grounded_messages("What is x?", hits)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "[1] (doc:0)" in user and user.endswith("Question: What is x?")
    assert 1 <= used < 10 and f"[{used + 1}]" not in user and len(user) < MAX_CONTEXT_CHARS + 500
    empty, none_used = grounded_messages("Q?", [])
    assert none_used == 0 and "no passages" in empty[1]["content"]


def test_the_dispatcher_runs_transformers_beam_search_on_the_hf_engine(tiny_pipeline: Pipeline) -> None:
    from aiflow_ray.engines.beam import beam_search as any_engine_beam_search

    engine = tiny_pipeline.verifier_engine
    ids = engine.encode_prompt(PROMPTS[0], True)
    assert any_engine_beam_search(engine, ids, 3, 8).token_ids == beam_search(engine, ids, 3, 8).token_ids


@pytest.mark.real_model
@pytest.mark.slow
def test_llama_cpp_beam_search_on_the_real_gguf() -> None:
    """Our llama.cpp beam search (the cloud tier's on CPU nodes): width 1 is greedy up to near-ties (its
    batches hold two sequences, whose arithmetic may differ from one-sequence decodes in the last bits),
    wider beams never score below it, and the score it reports is the model's own for those tokens."""
    import numpy as np

    from aiflow_ray.config import SamplingConfig
    from aiflow_ray.engines.beam import beam_search as any_engine_beam_search
    from aiflow_ray.engines.loader import load_engine

    engine = load_engine("qwen2.5-coder-0.5b-instruct", engine="llama_cpp", beams=True)
    ids = engine.encode_prompt("Write a Python function that reverses a string.", True)
    greedy_ids, gaps = [], []
    engine.open_session("ref", ids)
    for _ in range(10):
        row = engine.score("ref", [], SamplingConfig(), with_logprobs=True).logprobs
        assert row is not None
        top2 = np.sort(row[0])[-2:]
        gaps.append(float(top2[1] - top2[0]))
        greedy_ids.append(int(np.argmax(row[0])))
        engine.append("ref", [greedy_ids[-1]])
    one = any_engine_beam_search(engine, ids, 1, 10)
    if one.token_ids != greedy_ids:
        first = next(i for i, (a, b) in enumerate(zip(one.token_ids, greedy_ids, strict=False)) if a != b)
        assert gaps[first] < 1.0, f"width 1 left greedy at token {first} without a near-tie ({gaps[first]:.2f})"
    for width in (2, 4):
        wide = any_engine_beam_search(engine, ids, width, 10, length_penalty=0.0)
        assert wide.sum_logprob >= one.sum_logprob - 0.5
        engine.open_session("check", ids)
        scored = engine.score("check", wide.token_ids[:-1], SamplingConfig(), with_logprobs=True).logprobs
        engine.release("check")
        assert scored is not None
        rescored = float(sum(scored[i][t] for i, t in enumerate(wide.token_ids)))
        assert abs(rescored - wide.sum_logprob) < 0.5 + 0.1 * len(wide.token_ids)
    assert engine.has_session("ref")  # the beams took its KV, not its tokens
    # A grounded prompt is longer than one llama.cpp batch (512 tokens): its prefill goes in chunks.
    long_ids = engine.encode_prompt(LONG_CONTEXT, True)
    assert len(long_ids) > 512
    engine.open_session("long", long_ids)
    first = engine.score("long", [], SamplingConfig(), with_logprobs=True).logprobs
    assert first is not None
    top2 = np.sort(first[0])[-2:]
    long_one = any_engine_beam_search(engine, long_ids, 1, 2)
    assert long_one.token_ids[0] == int(np.argmax(first[0])) or top2[1] - top2[0] < 1.0
    from aiflow_ray.engines.llama_cpp import LlamaCppEngine
    from aiflow_ray.engines.loader import resolve_gguf

    few = LlamaCppEngine(resolve_gguf("qwen2.5-coder-0.5b-instruct"), name="few", max_sequences=8, kv_tokens=1024)
    with pytest.raises(ValueError, match="sequences"):
        any_engine_beam_search(few, ids, 16, 4)
