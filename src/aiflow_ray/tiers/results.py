"""What the device tier hands back to the ingress: typed results, stream events and refusals.

The device tier decodes text and names logprob tokens (it holds the tokenizer); the ingress only
shapes these values into its HTTP answers. A failure inside the tier arrives as a ``Refusal``
value, in place of a result or as the last stream event, never as an exception to be parsed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiflow_ray.network.wire import Logprobs
from aiflow_ray.tiers.trace import Trace


@dataclass(frozen=True)
class TokenLogprob:
    """One output token as OpenAI's chat ``logprobs.content`` entries describe it."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = field(default_factory=list)  # [{token, logprob, bytes}]

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes, "top_logprobs": self.top_logprobs}


def name_logprobs(token_text: Callable[[int], str], token_ids: Sequence[int], lp: Logprobs) -> list[TokenLogprob]:
    """Pair each output token with its logprob and alternatives, as text the client can read."""
    out = []
    for i, token_id in enumerate(token_ids[: len(lp)]):
        text = token_text(int(token_id))
        top = [{"token": (alt := token_text(int(t))), "logprob": float(v), "bytes": list(alt.encode())}
               for t, v in zip(lp.top_ids[i], lp.top_logprobs[i], strict=True)]
        out.append(TokenLogprob(text, float(lp.chosen[i]), list(text.encode()), top))
    return out


@dataclass
class TierResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    trace: Trace
    logprobs: list[TokenLogprob] | None = None

    @property
    def sources(self) -> list[dict[str, Any]] | None:
        return self.trace.retrieval.get("hits") if self.trace.retrieval else None


@dataclass
class StreamDelta:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class StreamDone:
    text: str  # the last piece of text not yet sent
    num_tokens: int
    prompt_tokens: int
    trace: Trace
    logprobs: list[TokenLogprob] | None = None  # for the tokens of ``text``
    token_ids: list[int] = field(default_factory=list)  # the tokens of ``text``: held back, not sent in a delta
