"""Turning logits into the distributions we sample from (numpy, no torch, no I/O).

Two distributions matter. The *target* distribution p is the verifier's softmax after temperature,
top-k and top-p: the output of speculative sampling follows p exactly. The *draft* distribution q is
the drafter's softmax after temperature, truncated to its ``draft_top_k`` most likely tokens and
renormalised: the drafter samples from exactly this sparse q and ships it with each draft token, so
the verifier can form the rejection residual max(0, p - q) without vocabulary-sized messages.
"""

from __future__ import annotations

import numpy as np

from aiflow_ray.config import SamplingConfig


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float64)
    return exp / exp.sum(axis=-1, keepdims=True)


def target_probs(logits: np.ndarray, sampling: SamplingConfig) -> np.ndarray:
    """[n, V] logits -> [n, V] float64 target probabilities (temperature > 0)."""
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = _softmax(scaled)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        cumulative = np.cumsum(sorted_probs, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop_sorted = (cumulative - sorted_probs) >= sampling.top_p - 1e-9  # rounding of the running sum
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def draft_sparse_probs(logits: np.ndarray, sampling: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """[V] drafter logits -> (ids [K] int32, probs [K] float64) of the truncated draft distribution."""
    k = min(sampling.draft_top_k, logits.shape[-1])
    scaled = logits.astype(np.float64) / sampling.temperature
    ids = np.argpartition(-scaled, k - 1)[:k]
    probs = _softmax(scaled[ids])
    return ids.astype(np.int32), probs


def sample_sparse(ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    return int(ids[rng.choice(len(ids), p=probs)])


def pick_logprobs(logprobs: np.ndarray, chosen: list[int], top_n: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-probabilities of the chosen tokens and of the ``top_n`` most likely at each position.

    ``logprobs`` is [m, V] (m >= len(chosen)); returns ([m'] chosen, [m', n] ids, [m', n] logprobs) for
    m' = len(chosen), alternatives sorted by decreasing probability (ties by id, so both ends agree).
    """
    rows = logprobs[: len(chosen)]  # [m', V]
    picked = rows[np.arange(len(chosen)), chosen].astype(np.float32)
    if top_n == 0:
        return picked, np.zeros((len(chosen), 0), np.int32), np.zeros((len(chosen), 0), np.float32)
    part = np.argpartition(-rows, top_n - 1, axis=-1)[:, :top_n]  # [m', n] unordered
    vals = np.take_along_axis(rows, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)
    ids = np.take_along_axis(part, order, axis=-1).astype(np.int32)
    return picked, ids, np.take_along_axis(vals, order, axis=-1).astype(np.float32)
