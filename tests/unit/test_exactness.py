"""Greedy speculative output equals target-only greedy output, on tiny real models (fp32)."""

from __future__ import annotations

import pytest

from aiflow_ray.config import GenerateOptions, LinkConfig
from aiflow_ray.tiers.pipeline import Pipeline
from tests.conftest import PROMPTS

MAX_NEW = 32
VIRTUAL_LINK = LinkConfig(virtual_time=True)  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def references(tiny_pipeline: Pipeline) -> dict[str, list[int]]:
    out = {}
    for prompt in PROMPTS:
        ids = tiny_pipeline.verifier_engine.encode_prompt(prompt, chat=True)
        out[prompt] = tiny_pipeline.target_greedy(ids, MAX_NEW)
    return out


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_greedy_speculative_equals_target_greedy(tiny_pipeline: Pipeline, references, k: int) -> None:
    assert len(PROMPTS) >= 20
    accepted_any = 0
    for prompt in PROMPTS:
        opts = GenerateOptions(prompt=prompt, draft_len=k, max_new_tokens=MAX_NEW, link=VIRTUAL_LINK)
        result = tiny_pipeline.run(opts)
        assert result.token_ids == references[prompt], f"k={k} prompt={prompt!r}"
        assert result.trace.num_tokens == len(references[prompt])
        accepted_any += sum(result.trace.accepted)
    # The nested drafter must be accepted sometimes, or this test would not exercise acceptance.
    assert accepted_any > 0


def test_adaptive_and_server_only_equal_target_greedy(tiny_pipeline: Pipeline, references) -> None:
    for prompt in PROMPTS[:8]:
        for path, k in (("device-edge", "auto"), ("server-only", 1)):
            opts = GenerateOptions(prompt=prompt, path=path, draft_len=k, max_new_tokens=MAX_NEW, link=VIRTUAL_LINK)
            assert tiny_pipeline.run(opts).token_ids == references[prompt], (path, prompt)


def test_on_device_is_drafter_greedy(tiny_pipeline: Pipeline) -> None:
    prompt = PROMPTS[0]
    opts = GenerateOptions(prompt=prompt, path="on-device", max_new_tokens=MAX_NEW)
    result = tiny_pipeline.run(opts)
    drafter = tiny_pipeline.drafter_engine
    ids = drafter.encode_prompt(prompt, chat=True)
    reference = Pipeline(drafter, drafter).target_greedy(ids, MAX_NEW)
    assert result.token_ids == reference
    assert result.trace.bytes_up == 0 and result.trace.path == "on-device"


def test_eos_and_max_new_tokens_are_respected(tiny_pipeline: Pipeline) -> None:
    for k in (1, 7):
        opts = GenerateOptions(prompt=PROMPTS[1], draft_len=k, max_new_tokens=5, link=VIRTUAL_LINK)
        assert len(tiny_pipeline.run(opts).token_ids) == 5
