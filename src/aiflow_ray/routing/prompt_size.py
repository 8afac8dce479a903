"""How many tokens a prompt will take, from what the router knows before anything tokenizes it: its text's bytes
and its images count."""

from __future__ import annotations

from typing import Any

from aiflow_ray.network.estimators import Ewma, ForgettingLinearFit

# Before any outcome says: English text and code take about 4 bytes a token; a VLM image a few hundred.
PRIOR_TOKENS_PER_BYTE = 0.25
PRIOR_TOKENS_PER_IMAGE = 256.0
# How firmly the per-byte slope holds to the prior, in bytes squared: prompts of nearly one length leave it
# there and fit the overhead; prompts spread over a few hundred bytes set it themselves.
PRIOR_STRENGTH = 1000.0
MIN_TOKENS_PER_BYTE = 0.05


class PromptSize:
    """tokens = overhead + per_byte x text bytes + per_image x images, learned from the prompt tokens the
    ingress reports with each request's outcome: text-only prompts teach the first two, prompts with images the
    third.

    An overhead and a slope, not one ratio: a chat template's turns and markers come with every prompt (about
    30 tokens on the default models), so a ratio learned from a 7-byte prompt that took 31 tokens (4.4 a byte)
    priced a 70-byte prompt at 300 tokens, and its prefill 3-14x too high (docs/benchmarks/router.md).
    """

    def __init__(self) -> None:
        self.text = ForgettingLinearFit(forget=0.9, prior_slope=PRIOR_TOKENS_PER_BYTE, prior_strength=PRIOR_STRENGTH)
        self.per_image = Ewma(0.3)

    def observe(self, text_bytes: int, images: int, tokens: int) -> None:
        if not images:
            self.text.observe(float(text_bytes), float(tokens))
        else:
            self.per_image.update(max(tokens - self.text_tokens(text_bytes), 0.0) / images)

    def _line(self) -> tuple[float, float]:
        if self.text.count_weight == 0:
            return 0.0, PRIOR_TOKENS_PER_BYTE
        slope = max(self.text.slope(), MIN_TOKENS_PER_BYTE)
        return max(self.text.intercept(slope), 0.0), slope

    def text_tokens(self, text_bytes: int) -> float:
        overhead, per_byte = self._line()
        return overhead + per_byte * text_bytes

    def tokens(self, text_bytes: int, images: int = 0) -> int:
        return round(self.text_tokens(text_bytes) + images * (self.per_image.value or PRIOR_TOKENS_PER_IMAGE))

    def snapshot(self) -> dict[str, float | None]:
        overhead, per_byte = self._line()
        return {"overhead_tokens": round(overhead, 2), "tokens_per_byte": round(per_byte, 4),
                "tokens_per_image": self.per_image.value}

    def export(self) -> dict[str, Any]:
        return {"text_fit": self.text.state(), "tokens_per_image": self.per_image.value}

    def restore(self, saved: dict[str, Any]) -> None:
        fit = saved.get("text_fit")
        if isinstance(fit, list) and len(fit) == 5:
            self.text.set_state([float(v) for v in fit])
        self.per_image.value = saved.get("tokens_per_image") or self.per_image.value
