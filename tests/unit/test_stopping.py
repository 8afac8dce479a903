"""End of sequence, min_tokens and ignore_eos on every path, with a scripted engine whose greedy choice
is a fixed function of the position (an isolated unit: both models agree, so every draft is accepted
and the end-of-sequence token lands exactly where the script puts it)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pytest

from aiflow_ray.config import GenerateOptions, LinkConfig, SamplingConfig
from aiflow_ray.engines.base import DraftOutput, ScoreOutput, SessionNotFound
from aiflow_ray.tiers.device import _truncate_at_eos
from aiflow_ray.tiers.pipeline import Pipeline

EOS = 0
VOCAB = 16
PROMPT = [5, 6, 7]
# Greedy output after PROMPT: 3 tokens, end of sequence, then more text with a second EOS.
SCRIPT = [9, 10, 11, EOS, 12, 13, 14, EOS, 15, 9, 10, 11, 12, 13, 14, 15]


class ScriptedEngine:
    name = "scripted"
    vocab_size = VOCAB
    eos_token_ids = frozenset({EOS})
    vision = None  # text only

    def __init__(self) -> None:
        self.sessions: dict[str, list[int]] = {}

    def encode_prompt(self, prompt: str | list[dict[str, str]], chat: bool) -> list[int]:
        return list(PROMPT)

    def decode(self, token_ids: Sequence[int]) -> str:
        return " ".join(str(t) for t in token_ids if t != EOS)

    def vocab_fingerprint(self) -> str:
        return "scripted"

    def open_session(self, session_id: str, token_ids: Sequence[int], images: Sequence[object] = ()) -> None:
        self.sessions[session_id] = list(token_ids)

    def has_session(self, session_id: str) -> bool:
        return session_id in self.sessions

    def _get(self, session_id: str) -> list[int]:
        if session_id not in self.sessions:
            raise SessionNotFound(session_id)
        return self.sessions[session_id]

    def session_length(self, session_id: str) -> int:
        return len(self._get(session_id))

    def session_tokens(self, session_id: str) -> list[int]:
        return list(self._get(session_id))

    def append(self, session_id: str, token_ids: Sequence[int]) -> None:
        self._get(session_id).extend(token_ids)

    def rollback(self, session_id: str, length: int) -> None:
        del self._get(session_id)[length:]

    def _next(self, length: int) -> int:
        return SCRIPT[(length - len(PROMPT)) % len(SCRIPT)]

    def draft(self, session_id: str, k: int, sampling: SamplingConfig, rng: np.random.Generator | None) -> DraftOutput:
        n = self.session_length(session_id)
        return DraftOutput([self._next(n + i) for i in range(k)], None, None, 1e-4)

    def score(self, session_id: str, draft_ids: Sequence[int], sampling: SamplingConfig,
              with_logprobs: bool = False) -> ScoreOutput:
        time.sleep(1e-4)
        n = self.session_length(session_id)
        greedy = [self._next(n + i) for i in range(len(draft_ids) + 1)]
        logprobs = None
        if with_logprobs:
            logprobs = np.full((len(greedy), VOCAB), np.log(0.5 / (VOCAB - 1)), np.float32)
            logprobs[np.arange(len(greedy)), greedy] = np.log(0.5)
        return ScoreOutput(greedy, None, 1e-4, logprobs)

    def release(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


@pytest.fixture()
def pipeline() -> Pipeline:
    return Pipeline(ScriptedEngine(), ScriptedEngine())


def _run(pipeline: Pipeline, path: str, **kw: object) -> list[int]:
    opts = GenerateOptions(prompt="x", path=path, draft_len=3, max_new_tokens=12,
                           link=LinkConfig(bandwidth_bps=1e9, rtt_s=0.0, virtual_time=True), **kw)
    return pipeline.run(opts).token_ids


@pytest.mark.parametrize("path", ["on-device", "device-edge", "server-only"])
def test_end_of_sequence_min_tokens_and_ignore_eos_on_every_path(pipeline: Pipeline, path: str) -> None:
    assert _run(pipeline, path) == SCRIPT[:4]  # stops at (and keeps) the first EOS
    assert _run(pipeline, path, min_tokens=5) == SCRIPT[:8]  # the first EOS came too early; the second ends it
    assert _run(pipeline, path, min_tokens=4) == SCRIPT[:4]  # an EOS that is token number 4 may end 4 tokens
    assert _run(pipeline, path, min_tokens=12) == SCRIPT[:12]  # max_new_tokens as min_tokens: ignore EOS


def test_truncation_counts_tokens_already_emitted() -> None:
    assert _truncate_at_eos([1, EOS, 2, EOS], frozenset({EOS}), emitted_before=0, min_tokens=0) == ([1, EOS], True)
    assert _truncate_at_eos([1, EOS, 2, EOS], frozenset({EOS}), emitted_before=1, min_tokens=4) == ([1, EOS, 2, EOS],
                                                                                                   True)
    assert _truncate_at_eos([1, EOS, 2], frozenset({EOS}), emitted_before=0, min_tokens=5) == ([1, EOS, 2], False)


def test_logprobs_follow_the_emitted_tokens_on_both_verifier_paths(pipeline: Pipeline) -> None:
    for path in ("device-edge", "server-only"):
        opts = GenerateOptions(prompt="x", path=path, draft_len=3, max_new_tokens=7, logprobs=1, min_tokens=7,
                               link=LinkConfig(bandwidth_bps=1e9, rtt_s=0.0, virtual_time=True))
        result = pipeline.run(opts)
        assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids) == 7
        assert np.allclose(result.logprobs.chosen, np.log(0.5))
        assert result.logprobs.top_ids[:, 0].tolist() == result.token_ids
