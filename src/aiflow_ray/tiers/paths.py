"""The one path switch: which tiers run a request. The CLI, the benchmarks, the exactness tests and
the Serve device tier all call ``run_path``, so they cannot drift apart.

The caller supplies the transports (in process, or Serve handles), the draft-length policy it keeps
for the device (adaptive requests), and a lock for the drafter's model when several threads share
it; server-only requests never take that lock, since the drafter's model is not involved.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aiflow_ray.config import GenerateOptions
from aiflow_ray.errors import Refusal, RefusedError
from aiflow_ray.speculative.policy import DraftLenPolicy, FixedDraftLen, make_policy
from aiflow_ray.tiers.device import (
    DeviceDrafter,
    GenerationResult,
    OnRound,
    Transport,
    generate_server_only,
)
from aiflow_ray.tiers.grounded import CloudTransport, run_grounded
from aiflow_ray.tiers.resilience import Resilience


class PathUnavailable(RuntimeError):
    """The request names a path this deployment cannot run (e.g. no cloud tier)."""


class TokenizerMismatch(RuntimeError):
    """Drafter and verifier map text to different token ids: speculation would not be exact."""


def check_tokenizers(drafter_fingerprint: str, verifier_fingerprint: str, drafter: str = "drafter",
                     verifier: str = "verifier") -> None:
    if drafter_fingerprint != verifier_fingerprint:
        raise TokenizerMismatch(f"{drafter} and {verifier} do not share a tokenizer; speculative decoding needs "
                                "identical token ids")


@dataclass
class DeviceSide:
    """What the device contributes to any path: its drafter, how it tokenizes, and its model's lock."""

    drafter: DeviceDrafter
    lock: contextlib.AbstractContextManager[Any] | None = None
    embed: Callable[[str], np.ndarray] | None = None  # device-side query embedding (grounded path)
    max_context_tokens: int | None = None  # prompt + max_tokens every tier can hold (None: unchecked)
    # Tokenizing never waits for the model: a server-only request counts its prompt tokens while the
    # drafter generates for someone else.
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def locked(self) -> contextlib.AbstractContextManager[Any]:
        return self.lock if self.lock is not None else contextlib.nullcontext()

    def encode(self, opts: GenerateOptions, prompt: Any = None) -> list[int]:
        """The request's prompt ids (``prompt``: the grounded path's prompt with passages), refused when it and
        the output it asks for would not fit the context."""
        with self._tokenizer_lock:
            ids = self.drafter.engine.encode_prompt(prompt if prompt is not None else opts.prompt_input(),
                                                    True if prompt is not None else opts.chat)
        check_context(len(ids), opts, self.max_context_tokens, grounded=prompt is not None)
        return ids


def check_context(prompt_tokens: int, opts: GenerateOptions, limit_tokens: int | None,
                  grounded: bool = False) -> None:
    """A request longer than the models' context is the client's to shorten: a 400 naming the field, here
    where the prompt's tokens are first known, instead of a failure inside an engine that would reach the
    client as a retryable 503 and be retried in vain."""
    if limit_tokens is None or prompt_tokens + opts.max_new_tokens <= limit_tokens:
        return
    field_name = "messages" if opts.messages else "prompt"
    with_passages = " with its retrieved passages" if grounded else ""
    if prompt_tokens >= limit_tokens:
        raise RefusedError(Refusal(400, f"the {field_name} is {prompt_tokens:,} tokens{with_passages}; this "
                                   f"deployment serves at most {limit_tokens:,} tokens of input and output together",
                                   field_name))
    raise RefusedError(Refusal(400, f"max_tokens {opts.max_new_tokens:,} after {prompt_tokens:,} tokens of "
                               f"{field_name}{with_passages} passes the {limit_tokens:,}-token context; ask for at "
                               f"most {limit_tokens - prompt_tokens:,}", "max_tokens"))


def draft_policy_for(opts: GenerateOptions, adaptive: DraftLenPolicy | None) -> DraftLenPolicy:
    """The device's own adaptive policy for 'auto' (it keeps its estimates across requests), else fixed k."""
    if opts.draft_len == "auto":
        return adaptive if adaptive is not None else make_policy(opts.draft_policy())
    return FixedDraftLen(opts.draft_policy())


def run_path(opts: GenerateOptions, device: DeviceSide, edge: Transport, *, policy: DraftLenPolicy | None = None,
             cloud: CloudTransport | None = None, cloud_link: Any = None,
             on_round: OnRound | None = None, resilience: Resilience | None = None) -> GenerationResult:
    """Run ``opts`` on ``opts.path``; ``edge.link`` is the device's link (emulated, or measured).
    ``resilience`` (served tiers) retries failed edge calls and lets 'fast' requests finish on the device."""
    drafter = device.drafter
    sampled_top_k = 0 if opts.sampling.greedy else opts.sampling.draft_top_k

    def speculate(prompt: Any = None) -> GenerationResult:
        ids = device.encode(opts, prompt)
        with device.locked():
            result = drafter.generate_speculative(
                ids, opts.max_new_tokens, opts.sampling, draft_policy_for(opts, policy), edge, on_round=on_round,
                min_tokens=opts.min_tokens, logprobs=opts.logprobs, draft_top_k=sampled_top_k, resilience=resilience)
        return result

    if opts.path == "on-device":
        ids = device.encode(opts)
        with device.locked():
            return drafter.generate_local(ids, opts.max_new_tokens, opts.sampling, on_token=on_round,
                                          min_tokens=opts.min_tokens)
    if opts.path == "server-only":
        # Tokenized once, here: only ids cross the link (the edge's tokenizer was checked to agree).
        prompt_ids = device.encode(opts)

        def finish_on_device(so_far: list[int], left: int) -> list[int]:
            with device.locked():
                return drafter.generate_local(prompt_ids + so_far, left, opts.sampling, on_token=on_round,
                                              min_tokens=max(opts.min_tokens - len(so_far), 0)).token_ids

        return generate_server_only(prompt_ids, opts.max_new_tokens, opts.sampling, edge, drafter.engine.decode,
                                    on_token=on_round, min_tokens=opts.min_tokens, logprobs=opts.logprobs,
                                    resilience=resilience, finish_on_device=finish_on_device)
    if opts.path == "device-edge":
        return speculate()
    if cloud is None or cloud_link is None:
        raise PathUnavailable("path 'device-edge-cloud' needs a cloud tier, and this deployment has none")
    device.encode(opts)  # the question alone must fit before the cloud searches for passages to add to it
    return run_grounded(opts, edge.link, cloud_link, cloud, speculate=speculate, embed=device.embed,
                        on_round=on_round)
