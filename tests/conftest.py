from __future__ import annotations

import os
from collections.abc import Iterator

# Before anything imports Ray, which reads these once: a pytest run not started by `make test` (which
# exports them) would otherwise have ray.init rewrite 127.0.0.1 to the host's routable address, and miss
# the local clusters' token auth.
from aiflow_ray.cluster import LOOPBACK_ENV

for _name, _value in LOOPBACK_ENV.items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402

from aiflow_ray.config import ModelPairConfig  # noqa: E402
from aiflow_ray.engines.base import Engine  # noqa: E402
from aiflow_ray.tiers.pipeline import Pipeline  # noqa: E402

PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nimport sys\n",
    "Explain recursion to a child.",
    "class Stack:\n    def __init__(self):",
    "SELECT name FROM users WHERE",
    "Write a haiku about the sea.",
    "for i in range(10):",
    "What is a closure in Python?",
    "Once upon a time",
    "x = [i * i for i in",
    "The capital of France is",
    "async def fetch(url):",
    "Summarise the plot of Hamlet.",
    "try:\n    value = int(text)\nexcept",
    "A list of prime numbers: 2, 3, 5,",
    "lambda x: x +",
    "How do vaccines work?",
    "with open('data.txt') as handle:",
    "Dear team, I am writing to",
    "git commit -m",
    "The mitochondria is",
]


@pytest.fixture(scope="session")
def tiny_pipeline() -> Pipeline:
    return Pipeline.load(ModelPairConfig.for_preset("tiny"))


@pytest.fixture(scope="session")
def vllm_pair() -> Iterator[tuple[Engine, Engine]]:
    """The tiny pair (32-wide heads, as vLLM's CPU attention needs) on vLLM's CPU build in fp32, started once per
    test session: vLLM's own scheduling, prefix caching and logprob readout in seconds a test."""
    from aiflow_ray.config import VllmArgs

    settings = VllmArgs(kv_cache_bytes=256 << 20, max_model_len=2048, dtype="float32")
    yield from _vllm_engines("tiny-vllm-drafter", "tiny-vllm-verifier", settings)


@pytest.fixture(scope="session")
def vllm_real_pair(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Engine]]:
    """The real 0.5B/1.5B pair on vLLM's CPU build (about two minutes to start; `make test-extended`)."""
    from aiflow_ray.config import VllmArgs

    # The engine's own dtype choice (fp32 where the CPU lacks bf16: 2-3.7x faster there) when this process runs
    # vLLM tests only. fp32 doubles the weights: beside the rest of the suite's models the 1.5B's worker
    # (10.7 GB) was OOM-killed on 24 GB, so a mixed run keeps bf16.
    only_vllm = all(item.get_closest_marker("vllm") is not None for item in request.session.items)
    settings = VllmArgs(kv_cache_bytes=1 << 30, max_model_len=2048, dtype="auto" if only_vllm else "bfloat16")
    yield from _vllm_engines("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", settings)


def _vllm_engines(drafter_name: str, verifier_name: str, settings: object) -> Iterator[tuple[Engine, Engine]]:
    from aiflow_ray.engines.loader import load_engine

    drafter = load_engine(drafter_name, engine="vllm", vllm=settings)  # type: ignore[arg-type]
    verifier = load_engine(verifier_name, engine="vllm", vllm=settings)  # type: ignore[arg-type]
    try:
        yield drafter, verifier
    finally:
        for engine in (drafter, verifier):
            engine.shutdown()  # type: ignore[attr-defined]


# Cases of a claim `make test` already checks on the same engine, moved to `make test-extended` for time.
EXTENDED_CASES: set[str] = set()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in EXTENDED_CASES:
            item.add_marker(pytest.mark.extended)
