"""Pure accept/reject math with hand-written token lists and distributions."""

from __future__ import annotations

import numpy as np
import pytest

from aiflow_ray.network.wire import normalize_q
from aiflow_ray.speculative.stats import SpecStats
from aiflow_ray.speculative.verify import verify_greedy, verify_sampled


@pytest.mark.parametrize(
    ("draft", "target", "expected"),
    [
        ([5, 6, 7], [5, 6, 7, 8], (3, 8)),  # all accepted: bonus token 8
        ([5, 6, 7], [5, 9, 7, 8], (1, 9)),  # rejected at position 1: correction 9
        ([5, 6, 7], [1, 6, 7, 8], (0, 1)),  # rejected at once
        ([], [4], (0, 4)),  # no draft: one target token
    ],
)
def test_verify_greedy(draft: list[int], target: list[int], expected: tuple[int, int]) -> None:
    assert verify_greedy(draft, target) == expected


def test_verify_greedy_needs_k_plus_one_targets() -> None:
    with pytest.raises(ValueError, match="k\\+1"):
        verify_greedy([1, 2], [1, 2])


def _monte_carlo_first_token(p: np.ndarray, q_full: np.ndarray, support: np.ndarray, trials: int, seed: int):
    """Draw d ~ q (sparse), run one-token rejection sampling, return the emitted first tokens."""
    rng = np.random.default_rng(seed)
    q_sparse = normalize_q(q_full[support].astype(np.float32))
    target = np.stack([p, p])  # [k+1=2, V]; the second row is the bonus distribution
    counts = np.zeros(p.shape[0])
    for _ in range(trials):
        drafted = int(support[rng.choice(len(support), p=q_sparse)])
        accepted, nxt = verify_sampled([drafted], support[None, :], q_sparse[None, :], target, rng)
        counts[drafted if accepted == 1 else nxt] += 1
    return counts / trials


def test_rejection_sampling_follows_target_distribution() -> None:
    vocab = 12
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(vocab) * 0.5)
    q = rng.dirichlet(np.ones(vocab) * 0.5)
    support = np.argsort(-q)[:5].astype(np.int32)  # the drafter only proposes its top 5 tokens
    freq = _monte_carlo_first_token(p, q, support, trials=40_000, seed=1)
    # Total variation to the target shrinks like 1/sqrt(n); 40k draws over 12 tokens stay well under 0.02.
    assert 0.5 * np.abs(freq - p).sum() < 0.02
    # And the draft distribution itself is measurably different, so the test can fail.
    q_sparse = np.zeros(vocab)
    q_sparse[support] = normalize_q(q[support].astype(np.float32))
    assert 0.5 * np.abs(q_sparse - p).sum() > 0.1


def test_rejection_sampling_chi_square_multi_token() -> None:
    """Two-position drafts: the joint distribution of the first two emitted tokens matches p1 x p2."""
    vocab = 6
    rng = np.random.default_rng(3)
    p1, p2, p3 = (rng.dirichlet(np.ones(vocab)) for _ in range(3))
    q1, q2 = (rng.dirichlet(np.ones(vocab)) for _ in range(2))
    support = np.arange(vocab, dtype=np.int32)
    counts = np.zeros((vocab, vocab))
    trials = 30_000
    for _ in range(trials):
        d1 = int(rng.choice(vocab, p=q1))
        d2 = int(rng.choice(vocab, p=q2))
        q_probs = np.stack([q1, q2])
        # The target at position 2 is conditioned on d1; here we let it not depend on it for a clean
        # product, which is what the check is about.
        accepted, nxt = verify_sampled([d1, d2], np.stack([support, support]), q_probs, np.stack([p1, p2, p3]), rng)
        emitted = [*[d1, d2][:accepted], nxt]
        if len(emitted) < 2:
            # Continue as the loop would: the next round samples position 2 from p2 directly.
            emitted.append(int(rng.choice(vocab, p=p2)))
        counts[emitted[0], emitted[1]] += 1
    expected = np.outer(p1, p2) * trials
    chi2 = ((counts - expected) ** 2 / expected).sum()
    # 35 degrees of freedom: the 99.9th percentile of chi-square is about 66.6.
    assert chi2 < 66.6


def test_zero_draft_probability_is_rejected() -> None:
    with pytest.raises(ValueError, match="zero draft probability"):
        verify_sampled([3], np.array([[1, 2]]), np.array([[0.5, 0.5]]), np.full((2, 4), 0.25), np.random.default_rng())


def test_stats_counters_and_rates() -> None:
    stats = SpecStats()
    stats.observe(4, 4)  # all accepted + bonus
    stats.observe(4, 1)  # one accepted, rejected at position 2
    stats.observe(0, 0)  # a round without draft
    assert stats.num_drafts == 2
    assert stats.num_draft_tokens == 8
    assert stats.num_accepted_tokens == 5
    assert stats.num_rejections == 1
    assert stats.num_output_tokens == 5 + 2 + 1
    assert stats.accepted_per_position == [2, 1, 1, 1]
    assert stats.drafted_per_position == [2, 2, 2, 2]
    assert stats.acceptance_rate == pytest.approx(5 / 8)
    assert stats.alpha == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        stats.observe(2, 3)
