"""The engine protocol: what the drafter and verifier tiers need from a model runtime.

Contract (all methods synchronous, one session used by one caller at a time):
- A *session* holds committed token ids and whatever KV state the engine keeps for them. ``draft``
  and ``score`` never commit; the caller commits with ``append`` or ``rollback``, and the engine
  reuses the KV cache for the longest common prefix of what it computed and what was committed.
- ``draft(k)`` runs k incremental steps of the small model from the committed tokens.
- ``score(draft)`` runs one forward over the committed-but-uncached tokens plus the draft and returns
  the target's next-token choice (greedy) or distribution (sampling) at each of the k+1 positions.
  A vLLM adapter can implement it with ``prompt_logprobs`` over context+draft. With
  ``with_logprobs`` it also returns the model's raw log-softmax at those positions (before
  temperature, top-k or top-p), which the API reports as logprobs.
- ``vocab_fingerprint()`` digests how the engine encodes a fixed probe set (code, Unicode, special
  tokens, a chat): two engines agree on it exactly when a request tokenized by one means the same
  ids to the other, whatever runtime each uses (an HF tokenizer or a GGUF's own).
- Images: a vision-language engine has a ``vision`` spec (``aiflow_ray.vision.preprocess.VisionSpec``; None
  for text-only engines) and takes ``images`` in ``open_session``: one ``ImageInput`` per image block of the
  token ids, in order. The session keeps them until it is released, so whatever KV the engine drops it can
  recompute: the image crosses the link once per session. A text-only engine refuses images.
- Errors: unknown sessions raise ``SessionNotFound``; the caller (the verifier tier) turns that into
  a "send the context again" reply, never into a different output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from aiflow_ray.config import SamplingConfig
from aiflow_ray.vision.preprocess import VisionSpec


class SessionNotFound(KeyError):
    """The engine holds no state for this session (restart, eviction, another replica)."""


class ImagesNotSupported(ValueError):
    """Images were given to an engine whose model takes text only."""


@dataclass(frozen=True)
class ImageInput:
    """One image as an engine takes it: preprocessed tiles, or the vision encoder's output."""

    tiles: np.ndarray | None = None  # [n, S, S, 3] uint8, the verifier's preprocessing (vision.preprocess)
    features: np.ndarray | None = None  # [tokens, D] float32 vision features before the projector

    def __post_init__(self) -> None:
        if (self.tiles is None) == (self.features is None):
            raise ValueError("an image is either tiles or features")


@dataclass
class DraftOutput:
    token_ids: list[int]  # [k] draft tokens
    q_ids: np.ndarray | None  # [k, K] int32 support of the draft distribution (sampling only)
    q_probs: np.ndarray | None  # [k, K] float64 draft probabilities over q_ids (sampling only)
    compute_s: float


@dataclass
class ScoreOutput:
    greedy_ids: list[int] | None  # [k+1] target argmax at each draft position plus the bonus position
    probs: np.ndarray | None  # [k+1, V] target distribution (sampling only)
    compute_s: float
    logprobs: np.ndarray | None = None  # [k+1, V] float32 raw log-softmax (with_logprobs only)
    # Set when the forward was shared with other sessions' (one llama_decode for several): the tokens it fed in
    # all on one of the calls that shared it, 0 on the others, so a service time is counted once; compute_s is
    # then the shared forward's own time.
    shared_forward_tokens: int | None = None


@dataclass
class BeamResult:
    token_ids: list[int]  # generated tokens of the best beam (prompt excluded)
    sum_logprob: float  # sum of the log-probabilities of those tokens under the model
    compute_s: float


class Engine(Protocol):
    name: str
    vocab_size: int
    eos_token_ids: frozenset[int]
    vision: VisionSpec | None  # None: the model takes text only

    def encode_prompt(self, prompt: str | list[dict[str, str]], chat: bool) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def vocab_fingerprint(self) -> str: ...

    def open_session(self, session_id: str, token_ids: Sequence[int], images: Sequence[ImageInput] = ()) -> None: ...

    def has_session(self, session_id: str) -> bool: ...

    def session_length(self, session_id: str) -> int: ...

    def session_tokens(self, session_id: str) -> list[int]: ...

    def append(self, session_id: str, token_ids: Sequence[int]) -> None: ...

    def rollback(self, session_id: str, length: int) -> None: ...

    def draft(
        self, session_id: str, k: int, sampling: SamplingConfig, rng: np.random.Generator | None
    ) -> DraftOutput: ...

    def score(self, session_id: str, draft_ids: Sequence[int], sampling: SamplingConfig,
              with_logprobs: bool = False) -> ScoreOutput: ...

    def release(self, session_id: str) -> None: ...


# What two tokenizers must encode identically before one's ids may be handed to the other.
PROBE_TEXTS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product\n\t\tx = {'k': [1, 2.5e-3]}",
    "Grüße aus Köln! Ça coûte 5 €. Привет, мир. 你好，世界。 こんにちは 🙂🚀 naïve café",
    "<|im_start|>user\nHello<|im_end|>\n<|endoftext|> spaces:    and\r\nnewlines\n\n",
    "   leading spaces, trailing spaces   ",
)
PROBE_CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Sum 1..10 in Python?"}]


def tokenizer_fingerprint(encode: Callable[[str | list[dict[str, str]], bool], list[int]]) -> str:
    """sha256 over the encodings of the probe set (raw texts, and a chat). Not the vocabulary size:
    runtimes pad the embedding table differently, and ids out of range are refused where they arrive."""
    digest = hashlib.sha256()
    for text in PROBE_TEXTS:
        digest.update((",".join(map(str, encode(text, False))) + "\n").encode())
    digest.update(",".join(map(str, encode(PROBE_CHAT, True))).encode())
    return digest.hexdigest()


class SessionTable:
    """The bookkeeping every engine shares: sessions by id, their committed ids, append and rollback.

    An engine subclasses it, keeps ``self._sessions`` (id -> its session object, which has a
    ``tokens`` list), makes sessions in ``_new_session`` and hears of rollbacks in ``_rolled_back``.
    """

    _sessions: dict[str, Any]
    vision: VisionSpec | None = None

    def _new_session(self, tokens: list[int]) -> Any:
        raise NotImplementedError

    def _attach_images(self, session: Any, tokens: list[int], images: Sequence[ImageInput]) -> None:
        """Keep a new session's images; text-only engines have none to keep."""
        raise ImagesNotSupported(f"{getattr(self, 'name', 'this model')} takes text only")

    def _rolled_back(self, session: Any, length: int) -> None:
        """Called after a session's committed ids were cut to ``length``."""

    def open_session(self, session_id: str, token_ids: Sequence[int], images: Sequence[ImageInput] = ()) -> None:
        if not token_ids:
            raise ValueError("a session needs at least one token")
        self.release(session_id)
        tokens = [int(t) for t in token_ids]
        session = self._new_session(tokens)
        if images or getattr(self, "vision", None) is not None:  # a vision engine checks image blocks always
            self._attach_images(session, tokens, images)
        self._sessions[session_id] = session

    def release(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def _get(self, session_id: str) -> Any:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFound(session_id) from None

    def session_length(self, session_id: str) -> int:
        return len(self._get(session_id).tokens)

    def session_tokens(self, session_id: str) -> list[int]:
        return list(self._get(session_id).tokens)

    def append(self, session_id: str, token_ids: Sequence[int]) -> None:
        self._get(session_id).tokens.extend(int(t) for t in token_ids)

    def rollback(self, session_id: str, length: int) -> None:
        session = self._get(session_id)
        if not 1 <= length <= len(session.tokens):
            raise ValueError(f"cannot roll back to {length}: session has {len(session.tokens)} tokens")
        del session.tokens[length:]
        self._rolled_back(session, length)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)
