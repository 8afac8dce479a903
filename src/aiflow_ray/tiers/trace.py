"""What a generation reports: output plus a trace of where the time and bytes went."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Trace:
    path: str
    rounds: int = 0
    draft_lens: list[int] = field(default_factory=list)  # [rounds]
    accepted: list[int] = field(default_factory=list)  # [rounds] accepted tokens per round
    round_draft_s: list[float] = field(default_factory=list)  # [rounds] device compute per round
    round_verify_s: list[float] = field(default_factory=list)  # [rounds] edge compute per round
    round_bytes: list[int] = field(default_factory=list)  # [rounds] bytes both ways, resends included
    round_link_s: list[float] = field(default_factory=list)  # [rounds] round trip minus edge compute
    acceptance_rate: float = 0.0  # accepted / drafted
    alpha: float = 0.0  # per-position acceptance (accepted / (accepted + rejected))
    bytes_up: int = 0
    bytes_down: int = 0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    total_s: float = 0.0
    draft_s: float = 0.0  # device compute
    verify_s: float = 0.0  # edge compute (reported by the edge)
    link_s: float = 0.0  # time spent on the link (RTT + serialisation + queueing)
    context_resends: int = 0
    failovers: int = 0  # edge calls retried after a replica failed or missed its deadline
    fallback: str = ""  # why the device finished the output on its own ("" = it did not)
    fallback_at: int = -1  # output tokens verified before the fallback
    switched_at: int = -1  # output tokens before a device-edge request went on server-only (-1: it did not)
    switch_reason: str = ""
    link_outages: list[list[float]] = field(default_factory=list)  # [bytes, seconds waited] of stalled transfers
    num_tokens: int = 0
    policy: dict[str, float] = field(default_factory=dict)
    # Grounded answers: bytes and seconds per link, seconds per stage, and the chunks used.
    links: dict[str, dict[str, float]] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    retrieval: dict[str, Any] = field(default_factory=dict)
    # Images: the representation sent over the device link, and its bytes against the client's.
    image_upload: str = ""  # "" = no image; else raw | resized | jpeg | features
    image_bytes_raw: int = 0
    image_bytes_sent: int = 0  # once per edge session: a resend after a lost session counts again
    image_bytes_each: list[int] = field(default_factory=list)  # [images] what one crossing of each takes
    # Time at which each output token reached the device, relative to the request start.
    token_times_s: list[float] = field(default_factory=list)

    def finish(self) -> None:
        """Derive the per-request figures from the token times."""
        self.num_tokens = len(self.token_times_s)
        if not self.token_times_s:
            return
        self.ttft_s = self.token_times_s[0]
        self.total_s = self.token_times_s[-1]
        self.tpot_s = decode_tpot_s(self.token_times_s)

    def to_dict(self, with_token_times: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_token_times:
            out.pop("token_times_s")
        return out


def decode_tpot_s(token_times_s: list[float]) -> float:
    """Time after the first emission divided by the tokens emitted after it.

    Speculative rounds emit several tokens at once; counting the first round's burst in the
    denominator (the usual (e2e - TTFT) / (n - 1)) would flatter speculation by a few percent.
    For one-token-at-a-time paths the two definitions agree.
    """
    first = token_times_s[0]
    later = [t for t in token_times_s if t > first]
    if not later:
        return 0.0
    return (token_times_s[-1] - first) / len(later)
