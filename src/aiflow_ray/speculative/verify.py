"""Verification of one draft block: greedy matching and rejection sampling (Leviathan et al. 2023).

Both return ``(num_accepted, next_token)``; the round's output tokens are
``draft[:num_accepted] + [next_token]`` where next_token is the correction (num_accepted < k) or the
bonus token (num_accepted == k).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def verify_greedy(draft_ids: Sequence[int], target_argmax: Sequence[int]) -> tuple[int, int]:
    """draft_ids [k], target_argmax [k+1] -> (accepted, correction-or-bonus).

    Greedy speculative output equals target-only greedy output because every emitted token is the
    target's argmax given the exact same prefix.
    """
    if len(target_argmax) != len(draft_ids) + 1:
        raise ValueError(f"need k+1={len(draft_ids) + 1} target tokens, got {len(target_argmax)}")
    accepted = 0
    for drafted, wanted in zip(draft_ids, target_argmax, strict=False):
        if drafted != wanted:
            break
        accepted += 1
    return accepted, int(target_argmax[accepted])


def verify_sampled(
    draft_ids: Sequence[int],
    q_ids: np.ndarray,
    q_probs: np.ndarray,
    target_probs: np.ndarray,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Rejection sampling over one block.

    draft_ids [k]; q_ids, q_probs [k, K]: the sparse draft distribution each draft token was sampled
    from; target_probs [k+1, V]. Token d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
    on the first rejection the correction is drawn from max(0, p_i - q_i) renormalised; if all are
    accepted the bonus is drawn from p_{k+1}. The emitted tokens then follow p exactly.
    """
    k = len(draft_ids)
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"need k+1={k + 1} target distributions, got {target_probs.shape[0]}")
    for i, token in enumerate(draft_ids):
        support = q_ids[i]  # [K]
        q_token = float(q_probs[i][support == token].sum())
        if q_token <= 0.0:
            raise ValueError(f"draft token {token} at position {i} has zero draft probability")
        p_token = float(target_probs[i, token])
        if rng.random() < min(1.0, p_token / q_token):
            continue
        residual = target_probs[i].astype(np.float64).copy()  # [V]
        residual[support] = np.maximum(residual[support] - q_probs[i], 0.0)
        total = residual.sum()
        # p == q on the support leaves no residual mass; a rejection then has probability zero, so
        # this branch only guards against rounding.
        dist = residual / total if total > 1e-12 else target_probs[i] / target_probs[i].sum()
        return i, int(rng.choice(dist.shape[0], p=dist))
    last = target_probs[k].astype(np.float64)
    return k, int(rng.choice(last.shape[0], p=last / last.sum()))
