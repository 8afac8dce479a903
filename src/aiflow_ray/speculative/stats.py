"""Raw speculative counters; rates are derived, never stored (exporters read the counters)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    num_drafts: int = 0  # rounds that proposed at least one token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_rejections: int = 0  # rounds that ended with a correction token
    num_output_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [max k] accepted at position i
    drafted_per_position: list[int] = field(default_factory=list)  # [max k] drafted at position i

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        if not 0 <= num_accepted <= num_drafted:
            raise ValueError(f"accepted {num_accepted} of {num_drafted}")
        self.num_output_tokens += num_accepted + 1
        if num_drafted == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        self.num_rejections += int(num_accepted < num_drafted)
        for counts, upto in ((self.drafted_per_position, num_drafted), (self.accepted_per_position, num_accepted)):
            if len(counts) < num_drafted:
                counts.extend([0] * (num_drafted - len(counts)))
            for i in range(upto):
                counts[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def alpha(self) -> float:
        """Per-position acceptance probability (geometric MLE), the cost model's ``a``."""
        denom = self.num_accepted_tokens + self.num_rejections
        return self.num_accepted_tokens / denom if denom else 0.0

    @property
    def mean_accepted_per_draft(self) -> float:
        return self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def merge(self, other: SpecStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_rejections += other.num_rejections
        self.num_output_tokens += other.num_output_tokens
        for mine, theirs in ((self.accepted_per_position, other.accepted_per_position),
                             (self.drafted_per_position, other.drafted_per_position)):
            if len(mine) < len(theirs):
                mine.extend([0] * (len(theirs) - len(mine)))
            for i, value in enumerate(theirs):
                mine[i] += value
