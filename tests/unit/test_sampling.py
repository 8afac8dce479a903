from __future__ import annotations

import numpy as np
import pytest

from aiflow_ray.config import SamplingConfig
from aiflow_ray.speculative.sampling import draft_sparse_probs, target_probs


def test_target_probs_temperature_top_k_top_p() -> None:
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    plain = target_probs(logits, SamplingConfig(temperature=1.0))
    np.testing.assert_allclose(plain[0], [0.5, 0.3, 0.15, 0.05], rtol=1e-9)
    top2 = target_probs(logits, SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(top2[0], [0.625, 0.375, 0, 0], rtol=1e-9)
    nucleus = target_probs(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    # 0.5 + 0.3 reaches 0.8: the rest is dropped.
    np.testing.assert_allclose(nucleus[0], [0.625, 0.375, 0, 0], rtol=1e-9)
    cold = target_probs(logits, SamplingConfig(temperature=0.5))
    assert cold[0, 0] > plain[0, 0]


def test_draft_sparse_probs_are_top_k_renormalised() -> None:
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    ids, probs = draft_sparse_probs(logits, SamplingConfig(temperature=1.0, draft_top_k=2))
    assert sorted(ids.tolist()) == [1, 3]
    assert probs.sum() == pytest.approx(1.0)
    assert dict(zip(ids.tolist(), probs.tolist(), strict=True))[1] == pytest.approx(0.4 / 0.7)
