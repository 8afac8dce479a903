"""Greedy exactness on the real Qwen2.5-Coder 0.5B/1.5B pair, in fp32 (bf16 block verification can
flip near-tied tokens; the benchmark reports that share instead)."""

from __future__ import annotations

import pytest

from aiflow_ray.config import GenerateOptions, LinkConfig, ModelPairConfig
from aiflow_ray.tiers.pipeline import Pipeline

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

# fp32 on the real pair costs about 3 minutes a prompt on a 2-core AVX2 machine: `make test` checks one,
# `make test-extended` all three.
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    pytest.param("Explain what a hash map is in two sentences.", marks=pytest.mark.extended),
    pytest.param("def quicksort(items):", marks=pytest.mark.extended),
]
MAX_NEW = 24


@pytest.fixture(scope="module")
def real_pipeline() -> Pipeline:
    return Pipeline.load(ModelPairConfig(dtype="float32", device="cpu"))


def test_real_pair_shares_a_tokenizer(real_pipeline: Pipeline) -> None:
    assert real_pipeline.drafter_engine.vocab_size == real_pipeline.verifier_engine.vocab_size == 151_936
    assert real_pipeline.drafter_engine.vocab_fingerprint() == real_pipeline.verifier_engine.vocab_fingerprint()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_pair_greedy_exactness_fp32(real_pipeline: Pipeline, prompt: str) -> None:
    ids = real_pipeline.verifier_engine.encode_prompt(prompt, chat=True)
    reference = real_pipeline.target_greedy(ids, MAX_NEW)
    accepted = 0
    for k in (3, 8):
        opts = GenerateOptions(prompt=prompt, draft_len=k, max_new_tokens=MAX_NEW,
                               link=LinkConfig(virtual_time=True))  # type: ignore[call-arg]
        result = real_pipeline.run(opts)
        expected = real_pipeline.verifier_engine.decode(reference)
        assert result.token_ids == reference, f"k={k}: {result.text!r} != {expected!r}"
        accepted += sum(result.trace.accepted)
    assert accepted > 0
