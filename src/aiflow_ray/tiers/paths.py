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
    PathSwitch,
    Transport,
)
from aiflow_ray.tiers.grounded import CloudTransport, run_grounded
from aiflow_ray.tiers.images import PreparedImage, prepare_image
from aiflow_ray.tiers.resilience import Resilience
from aiflow_ray.tiers.server_only import generate_server_only
from aiflow_ray.vision.decode import ImageInputError, ImageLimits
from aiflow_ray.vision.prompting import IMAGE_PLACEHOLDER, ImagePromptError


class PathUnavailable(RuntimeError):
    """The request names a path this deployment cannot run (e.g. no cloud tier)."""


class TokenizerMismatch(RuntimeError):
    """Drafter and verifier map text to different token ids: speculation would not be exact."""


class VisionMismatch(RuntimeError):
    """Drafter and verifier see images differently: the device could not count the verifier's image tokens."""


def check_vision(drafter: Any, verifier: Any) -> None:
    """A pair takes images only if both models preprocess them identically (same tiles, same token counts)."""
    mine, theirs = drafter.vision, verifier.vision
    if (mine is None) != (theirs is None):
        raise VisionMismatch(f"{drafter.name} and {verifier.name}: one takes images and the other does not")
    if mine is not None and mine.fingerprint() != theirs.fingerprint():
        raise VisionMismatch(f"{drafter.name} and {verifier.name} preprocess images differently ({mine} vs {theirs})")


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
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    # The verifier's vision encoder, when the device learnt it (start-up check): equal to the drafter's, the
    # device may send its encoder's features instead of pixels.
    verifier_encoder_digest: str | None = None
    # Tokenizing never waits for the model: a server-only request counts its prompt tokens while the
    # drafter generates for someone else.
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    def locked(self) -> contextlib.AbstractContextManager[Any]:
        return self.lock if self.lock is not None else contextlib.nullcontext()

    def encode(self, opts: GenerateOptions, prompt: Any = None, images: list[PreparedImage] | None = None
               ) -> list[int]:
        """The request's prompt ids (``prompt``: the grounded path's prompt with passages), refused when it and
        the output it asks for would not fit the context. ``images``: the request's, prepared."""
        engine = self.drafter.engine
        text = prompt if prompt is not None else opts.prompt_input()
        chat = True if prompt is not None else opts.chat
        field_name = "messages" if opts.messages else "prompt"
        with self._tokenizer_lock:
            if engine.vision is None:
                ids = engine.encode_prompt(text, chat)
            else:
                vision = engine.vision
                tokens = [vision.tokens_for(image.tiles.shape) for image in images or ()]
                if tokens:
                    text = with_image_placeholders(text, len(tokens))
                try:
                    ids = (engine.encode_image_prompt(text, chat, tokens) if tokens  # type: ignore[attr-defined]
                           else engine.encode_prompt(text, chat))
                    if not tokens:
                        engine.check_image_blocks(ids, [])  # type: ignore[attr-defined]
                except (ImagePromptError, ValueError) as exc:
                    raise RefusedError(Refusal(400, str(exc), field_name)) from None
        check_context(len(ids), opts, self.max_context_tokens, grounded=prompt is not None)
        return ids

    def prepare_images(self, opts: GenerateOptions, send: bool = True) -> list[PreparedImage]:
        """Decode the request's images safely and encode them for the link (``send``), on this device.

        Each error is a 400/413/415 naming the image's field; a model without vision is a 400 too."""
        if not opts.images:
            return []
        engine = self.drafter.engine
        if engine.vision is None:
            raise RefusedError(Refusal(400, f"the model {engine.name} takes text only; remove the image",
                                       opts.images[0].field))
        if len(opts.images) > self.image_limits.max_images:
            raise RefusedError(Refusal(400, f"{len(opts.images)} images; at most {self.image_limits.max_images} "
                                       "are allowed per request", opts.images[0].field))
        own_digest = getattr(engine, "encoder_digest", None)
        shared = own_digest is not None and own_digest == self.verifier_encoder_digest
        prepared = []
        for image in opts.images:
            try:
                prepared.append(prepare_image(
                    image.data, image.field, opts.image_upload if send else "raw", engine.vision, self.image_limits,
                    bandwidth_bps=opts.link.bandwidth_bps,
                    features=getattr(engine, "vision_features", None) if shared else None,
                    encoder_digest=own_digest if shared else None, lossy_ok=opts.device_fallback))
            except ImageInputError as exc:
                raise RefusedError(Refusal(exc.status, str(exc), exc.field)) from None
        return prepared


def with_image_placeholders(prompt: Any, count: int) -> Any:
    """InternVL's convention: images a prompt does not place come first (before the text of the last user turn)."""
    texts = [turn["content"] for turn in prompt] if isinstance(prompt, list) else [prompt]
    if any(IMAGE_PLACEHOLDER in text for text in texts):
        return prompt
    prefix = f"{IMAGE_PLACEHOLDER}\n" * count
    if not isinstance(prompt, list):
        return prefix + prompt
    turns = [dict(turn) for turn in prompt]
    last_user = max((i for i, turn in enumerate(turns) if turn["role"] == "user"), default=len(turns) - 1)
    turns[last_user]["content"] = prefix + turns[last_user]["content"]
    return turns


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

    # Images are decoded and encoded for the link once, on the device, before any model runs.
    images = device.prepare_images(opts, send=opts.path != "on-device")

    def speculate(prompt: Any = None) -> GenerationResult:
        ids = device.encode(opts, prompt, images)
        # A grounded answer keeps its one path.
        switch = PathSwitch(opts.switch_tpot_s) if opts.switch_tpot_s is not None and prompt is None else None
        with device.locked():
            result = drafter.generate_speculative(
                ids, opts.max_new_tokens, opts.sampling, draft_policy_for(opts, policy), edge, on_round=on_round,
                min_tokens=opts.min_tokens, logprobs=opts.logprobs, draft_top_k=sampled_top_k, resilience=resilience,
                images=images, switch=switch)
        if result.continuation is None:
            return result
        # The rest streams from the edge, with the device's model free for other requests meanwhile.
        generate_server_only(ids, opts.max_new_tokens, opts.sampling, edge, drafter.engine.decode, on_token=on_round,
                             min_tokens=opts.min_tokens, logprobs=opts.logprobs, resilience=resilience, images=images,
                             continuation=result.continuation)
        return result.continued(drafter.engine.decode)

    if opts.path == "on-device":
        ids = device.encode(opts, images=images)
        with device.locked():
            return drafter.generate_local(ids, opts.max_new_tokens, opts.sampling, on_token=on_round,
                                          min_tokens=opts.min_tokens, images=images)
    if opts.path == "server-only":
        # Tokenized once, here: only ids cross the link (the edge's tokenizer was checked to agree).
        prompt_ids = device.encode(opts, images=images)

        def finish_on_device(so_far: list[int], left: int) -> list[int]:
            with device.locked():
                return drafter.generate_local(prompt_ids + so_far, left, opts.sampling, on_token=on_round,
                                              min_tokens=max(opts.min_tokens - len(so_far), 0),
                                              images=images).token_ids

        return generate_server_only(prompt_ids, opts.max_new_tokens, opts.sampling, edge, drafter.engine.decode,
                                    on_token=on_round, min_tokens=opts.min_tokens, logprobs=opts.logprobs,
                                    resilience=resilience, finish_on_device=finish_on_device, images=images)
    if opts.path == "device-edge":
        return speculate()
    if cloud is None or cloud_link is None:
        raise PathUnavailable("path 'device-edge-cloud' needs a cloud tier, and this deployment has none")
    if images:
        raise PathUnavailable("the device-edge-cloud path takes text only; send images on another path")
    device.encode(opts)  # the question alone must fit before the cloud searches for passages to add to it
    return run_grounded(opts, edge.link, cloud_link, cloud, speculate=speculate, embed=device.embed,
                        on_round=on_round)
