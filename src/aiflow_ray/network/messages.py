"""The messages of the device <-> edge protocol, as Python values (wire.py encodes and decodes them).

Shapes in comments: k draft tokens, K the sparse draft distribution's support, m output tokens, n
logprob alternatives per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from aiflow_ray.config import SamplingConfig


class WireError(ValueError):
    """A payload that is not a well-formed message of this protocol."""


class MsgType(IntEnum):
    VERIFY = 1
    VERIFY_RESULT = 2
    GENERATE = 3
    TOKENS = 4
    RELEASE = 5
    ERROR = 6
    PING = 7  # link probe: padding makes probes of different sizes, which separates RTT from bandwidth
    PONG = 8


class ImageEncoding(IntEnum):
    """How an image crosses the link (the request's ``image_upload`` picks one)."""

    RAW = 0  # the client's encoded bytes, metadata removed
    TILES_PNG = 1  # the verifier's preprocessed tiles, stacked vertically, lossless
    TILES_JPEG = 2  # the same tiles, lossy
    FEATURES = 3  # the shared vision encoder's output, int8 per row with a float32 scale


class VerifyStatus(IntEnum):
    OK = 0
    NEED_CONTEXT = 1


@dataclass(frozen=True)
class Header:
    type: MsgType
    session_id: bytes  # 16 bytes
    seq: int


@dataclass
class Logprobs:
    """The verifier's log-probabilities of m output tokens, and of the n most likely tokens at each."""

    chosen: np.ndarray  # [m] float32 logprob of each output token
    top_ids: np.ndarray  # [m, n] int32
    top_logprobs: np.ndarray  # [m, n] float32

    def __len__(self) -> int:
        return len(self.chosen)

    def head(self, m: int) -> Logprobs:
        return Logprobs(self.chosen[:m], self.top_ids[:m], self.top_logprobs[:m])

    @staticmethod
    def concat(parts: list[Logprobs]) -> Logprobs | None:
        if not parts:
            return None
        return Logprobs(np.concatenate([p.chosen for p in parts]), np.concatenate([p.top_ids for p in parts]),
                        np.concatenate([p.top_logprobs for p in parts]))


@dataclass
class ImagePayload:
    """One image of a request, as it crosses the link once per session (with the context)."""

    encoding: ImageEncoding
    data: bytes
    orientation: int = 1  # raw only: the EXIF orientation the device applied (the metadata is not sent)


@dataclass
class VerifyRequest:
    header: Header
    base_len: int  # committed tokens the device believes the verifier holds
    draft_ids: np.ndarray  # [k] int32
    context: np.ndarray | None = None  # [n] int32, the full committed sequence, when (re)starting
    sampling: SamplingConfig | None = None  # sent with the context; None = greedy
    q_ids: np.ndarray | None = None  # [k, K] int32 sparse draft distribution support
    q_probs: np.ndarray | None = None  # [k, K] float32
    logprobs: int | None = None  # sent with the context: return logprobs with n alternatives per token
    images: tuple[ImagePayload, ...] = ()  # sent with the context: the images its image tokens stand for


@dataclass
class VerifyResult:
    header: Header
    status: VerifyStatus
    num_accepted: int = 0
    next_token: int = -1  # correction or bonus token
    verify_us: int = 0  # verifier compute time, so the device can separate link from compute
    committed_len: int = 0
    logprobs: Logprobs | None = None  # [accepted + 1] when the session asked for them


@dataclass
class GenerateRequest:
    header: Header
    prompt_ids: np.ndarray  # [n] int32: the request as the device tokenized it (text never crosses)
    max_new_tokens: int
    sampling: SamplingConfig | None
    min_tokens: int = 0  # an end-of-sequence token before this many tokens does not end the stream
    logprobs: int | None = None
    images: tuple[ImagePayload, ...] = ()
    # > 0: no prompt; continue the session this id names, which the edge holds at this many committed tokens
    # (a speculative request that goes on without drafts). Its sampling and logprobs are the session's own.
    continue_from: int = 0


@dataclass
class Tokens:
    header: Header
    token_ids: np.ndarray  # [n] int32
    done: bool
    logprobs: Logprobs | None = None


@dataclass
class Release:
    header: Header


@dataclass
class Ping:
    header: Header
    padding_bytes: int


@dataclass
class Pong:
    header: Header


@dataclass
class ErrorMsg:
    header: Header
    code: int
    message: str


Message = VerifyRequest | VerifyResult | GenerateRequest | Tokens | Release | ErrorMsg | Ping | Pong
