"""Beam search on the cloud's large model, and the grounded prompt (tiny models, real generation)."""

from __future__ import annotations

import pytest

from aiflow_ray.config import GenerateOptions, LinkConfig
from aiflow_ray.engines.hf import beam_search
from aiflow_ray.rag.prompting import MAX_CONTEXT_CHARS, grounded_messages
from aiflow_ray.tiers.pipeline import Pipeline

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
