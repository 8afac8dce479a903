"""Estimators fed by observed transfers and timings; none of them reads emulator settings.

``ForgettingLinearFit`` is weighted least squares for y = a + b x with exponential forgetting, so
old observations fade and the fit follows changing conditions. ``LinkEstimator`` applies it to round
trips: link time = RTT + bytes / bandwidth, so the intercept is the RTT and the slope 1/bandwidth.
Round trips of similar size cannot separate the two; then the slope stays near its prior and the
intercept absorbs the rest, which is what a decision at that size needs.

Probe pairs (a bare and a padded message sent back to back, see network/probe.py) measure the slope
directly: the difference of their times over the difference of their sizes cancels the RTT and any
per-call overhead. When pairs are available the slope is the median of the last few pair slopes,
which follows a change within two pairs and ignores one noisy pair, and the RTT is a moving average
of what each later round trip leaves after its bytes / bandwidth (old round trips, timed under other
conditions, would otherwise drag it for many rounds).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass


class Ewma:
    def __init__(self, alpha: float, initial: float | None = None) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.value = initial
        self.count = 0

    def update(self, sample: float) -> float:
        self.value = sample if self.value is None else self.alpha * sample + (1 - self.alpha) * self.value
        self.count += 1
        return self.value


class ForgettingLinearFit:
    """y = intercept + slope * x, by exponentially weighted least squares with a ridge prior.

    The slope is pulled toward ``prior_slope`` with strength ``prior_strength`` (in units of x^2):
    observations that barely vary in x leave it at the prior, widely spread ones override it. Without
    this, round trips of nearly equal size turn timing noise into absurd slopes.
    """

    def __init__(self, forget: float = 0.95, prior_slope: float = 0.0, prior_strength: float = 0.0) -> None:
        self.forget = forget
        self.prior_slope = prior_slope
        self.prior_strength = prior_strength
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0

    def observe(self, x: float, y: float, weight: float = 1.0) -> None:
        f = self.forget
        self._w = f * self._w + weight
        self._sx = f * self._sx + weight * x
        self._sy = f * self._sy + weight * y
        self._sxx = f * self._sxx + weight * x * x
        self._sxy = f * self._sxy + weight * x * y

    @property
    def count_weight(self) -> float:
        return self._w

    def slope(self) -> float:
        if self._w == 0:
            return self.prior_slope
        mean_x = self._sx / self._w
        sxx_c = max(self._sxx - self._w * mean_x * mean_x, 0.0)  # centred sums
        sxy_c = self._sxy - mean_x * self._sy
        denom = sxx_c + self.prior_strength
        if denom <= 0:
            return self.prior_slope
        return (sxy_c + self.prior_strength * self.prior_slope) / denom

    def intercept(self, slope: float) -> float:
        if self._w == 0:
            return 0.0
        return self._sy / self._w - slope * self._sx / self._w


@dataclass
class LinkEstimate:
    rtt_s: float
    bandwidth_bps: float
    samples: int


class LinkEstimator:
    """Bandwidth (bytes/s) and RTT from observed (bytes moved, link seconds) round trips."""

    def __init__(
        self,
        prior_bandwidth_bps: float = 1e6,
        prior_rtt_s: float = 0.02,
        forget: float = 0.95,
        prior_strength_bytes2: float = 1e4,
    ) -> None:
        # The prior is worth about one transfer that differs from the others by 100 bytes: weak enough
        # that rounds with and without a context upload identify a slow link, strong enough that
        # equal-sized rounds do not turn timing noise into a bandwidth.
        self._fit = ForgettingLinearFit(forget, 1.0 / prior_bandwidth_bps, prior_strength_bytes2)
        self._prior_rtt_s = prior_rtt_s
        self._pair_slopes: deque[float] = deque(maxlen=3)
        self._rtt_s = Ewma(0.3)
        self.samples = 0

    def observe(self, num_bytes: int, link_s: float) -> None:
        self._fit.observe(float(num_bytes), max(link_s, 0.0))
        if self._pair_slopes:
            self._rtt_s.update(max(link_s - num_bytes * statistics.median(self._pair_slopes), 0.0))
        self.samples += 1

    def observe_pair(self, small: tuple[int, float], big: tuple[int, float]) -> None:
        """A bare and a padded round trip sent back to back (both also count as round trips)."""
        (small_bytes, small_s), (big_bytes, big_s) = small, big
        if big_bytes <= small_bytes:
            raise ValueError("the padded probe must be the larger one")
        self._pair_slopes.append(max((big_s - small_s) / (big_bytes - small_bytes), 0.0))
        self.observe(small_bytes, small_s)
        self.observe(big_bytes, big_s)

    def estimate(self) -> LinkEstimate:
        if self.samples == 0:
            return LinkEstimate(self._prior_rtt_s, 1.0 / self._fit.prior_slope, 0)
        slope = statistics.median(self._pair_slopes) if self._pair_slopes else self._fit.slope()
        slope = max(slope, 1e-12)  # a negative slope is noise: bandwidth "infinite", not negative
        rtt = self._rtt_s.value if self._rtt_s.value is not None else max(self._fit.intercept(slope), 0.0)
        return LinkEstimate(rtt_s=rtt, bandwidth_bps=1.0 / slope, samples=self.samples)
