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

Both of those follow a change over several samples, which is too slow for a link that stalls: a
round trip far slower than the estimate predicts starts a *slow spell*, during which the slope is
the one that round trip implies with the RTT held (a stall shows as missing bandwidth; the RTT is
propagation and does not stall). A transfer that missed its deadline (``observe_outage``) starts
one as well. The spell's round trips are held back from the fits, so the first round trip that
matches the estimate again ends the spell and restores the estimate from before it; a spell that
lasts is the link's new condition, and its round trips then go into the fits.

The slope is kept to what round trips can measure: bandwidth within [1 B/s, 10 GB/s] (see
``MIN_BANDWIDTH_BPS`` and ``MAX_BANDWIDTH_BPS``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections import deque
from dataclasses import dataclass

# Round trips are timed with perf_counter on a shared host, whose scheduling noise is 0.1 ms or more,
# and the payloads are at most a few MB: at 10 GB/s they already take less than that noise, so a
# faster reading says only that noise cancelled the bytes' share of the time (a near-zero or negative
# slope once read as 1e12 B/s).
MAX_BANDWIDTH_BPS = 10e9
# At 1 B/s one 100-byte round takes minutes, beyond any deadline the link is used under: anything
# slower is an outage, which this floor already prices as unusable, and it keeps 1/bandwidth finite.
MIN_BANDWIDTH_BPS = 1.0
# A round trip starts a slow spell when it takes more than SLOW_RATIO times the predicted time plus
# SLOW_MARGIN_S: the margin is above the host's scheduling hiccups (GIL hand-offs, GC pauses, a
# contended core) so that one of those does not pass for a stall.
SLOW_RATIO = 2.0
SLOW_MARGIN_S = 0.05
# A missed deadline bounds the bandwidth from above only (bytes / seconds waited); nothing says the
# payload was close, so the estimate sits this factor below the bound.
OUTAGE_MARGIN = 2.0


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

    def state(self) -> list[float]:
        """The weighted sums, to save and ``set_state`` later."""
        return [self._w, self._sx, self._sy, self._sxx, self._sxy]

    def set_state(self, state: list[float]) -> None:
        self._w, self._sx, self._sy, self._sxx, self._sxy = state


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
        warmup_samples: int = 3,
        spell_adopt_samples: int = 8,
        min_bandwidth_bps: float = MIN_BANDWIDTH_BPS,
        max_bandwidth_bps: float = MAX_BANDWIDTH_BPS,
    ) -> None:
        if not 0 < min_bandwidth_bps <= max_bandwidth_bps < math.inf:
            raise ValueError("need 0 < min_bandwidth_bps <= max_bandwidth_bps < inf")
        self.min_bandwidth_bps = min_bandwidth_bps
        self.max_bandwidth_bps = max_bandwidth_bps
        # The prior is worth about one transfer that differs from the others by 100 bytes: weak enough
        # that rounds with and without a context upload identify a slow link, strong enough that
        # equal-sized rounds do not turn timing noise into a bandwidth.
        self._fit = ForgettingLinearFit(forget, 1.0 / prior_bandwidth_bps, prior_strength_bytes2)
        self._prior_rtt_s = prior_rtt_s
        self._pair_slopes: deque[float] = deque(maxlen=3)
        self._rtt_s = Ewma(0.3)
        self.samples = 0
        # Until the fits hold a few round trips, "slower than predicted" means "unlike the prior", which
        # is what the fits are there to learn, not a stall.
        self._warmup_samples = warmup_samples
        self._spell_adopt_samples = spell_adopt_samples
        self._fitted_samples = 0
        self._spell_slope: float | None = None  # s/byte while a slow spell lasts
        self._spell_held: list[tuple[int, float]] = []
        self._spell_samples = 0

    def observe(self, num_bytes: int, link_s: float) -> None:
        if not math.isfinite(link_s) or num_bytes < 0:
            return  # no measurement: a payload that never arrived is an outage (observe_outage)
        link_s = max(link_s, 0.0)
        self.samples += 1
        rtt_s, slope = self._base()
        predicted_s = rtt_s + num_bytes * slope
        if self._fitted_samples < self._warmup_samples or link_s <= SLOW_RATIO * predicted_s + SLOW_MARGIN_S:
            self._spell_slope = None
            self._spell_held.clear()
            self._spell_samples = 0
            self._fit_sample(num_bytes, link_s)
            return
        if num_bytes > 0:  # a bare round trip says nothing about bandwidth: keep the spell's slope
            # The newest round trip replaces what came before it (an outage's bound included): a spell
            # is a change under way, and a measured time beats a bound.
            self._spell_slope = (link_s - rtt_s) / num_bytes
        self._spell_samples += 1
        self._spell_held.append((num_bytes, link_s))
        if self._spell_samples >= self._spell_adopt_samples:
            for held_bytes, held_s in self._spell_held:
                self._fit_sample(held_bytes, held_s)
            self._spell_held.clear()

    def observe_outage(self, waited_s: float, num_bytes: int) -> None:
        """``num_bytes`` did not arrive within ``waited_s``: bandwidth is below num_bytes / waited_s.

        Starts (or deepens) a slow spell at once; the next round trip that matches the estimate from
        before it, or a probe pair whose round trips do, ends it. ``waited_s`` may be inf (never arrived).
        """
        if num_bytes < 1 or not waited_s > 0:
            raise ValueError(f"an outage needs bytes >= 1 and a positive wait, got {num_bytes}, {waited_s}")
        outage_slope = OUTAGE_MARGIN * waited_s / num_bytes
        self._spell_slope = outage_slope if self._spell_slope is None else max(self._spell_slope, outage_slope)

    def _fit_sample(self, num_bytes: int, link_s: float) -> None:
        self._fit.observe(float(num_bytes), link_s)
        if self._pair_slopes:
            self._rtt_s.update(max(link_s - num_bytes * statistics.median(self._pair_slopes), 0.0))
        self._fitted_samples += 1

    def _clamp_slope(self, slope: float) -> float:
        if math.isnan(slope):
            slope = self._fit.prior_slope
        # A negative slope is noise too: it clamps to the ceiling, not to a negative bandwidth.
        return min(max(slope, 1.0 / self.max_bandwidth_bps), 1.0 / self.min_bandwidth_bps)

    def _base(self) -> tuple[float, float]:
        """(RTT seconds, seconds per byte) from the fits, without any slow spell."""
        if self._fitted_samples == 0:
            return self._prior_rtt_s, self._clamp_slope(self._fit.prior_slope)
        slope = self._clamp_slope(statistics.median(self._pair_slopes) if self._pair_slopes else self._fit.slope())
        rtt = self._rtt_s.value if self._rtt_s.value is not None else max(self._fit.intercept(slope), 0.0)
        return rtt, slope

    def observe_pair(self, small: tuple[int, float], big: tuple[int, float]) -> None:
        """A bare and a padded round trip sent back to back (both also count as round trips)."""
        (small_bytes, small_s), (big_bytes, big_s) = small, big
        if big_bytes <= small_bytes:
            raise ValueError("the padded probe must be the larger one")
        if math.isfinite(big_s) and math.isfinite(small_s):
            self._pair_slopes.append(max((big_s - small_s) / (big_bytes - small_bytes), 0.0))
        self.observe(small_bytes, small_s)
        self.observe(big_bytes, big_s)

    @property
    def in_slow_spell(self) -> bool:
        return self._spell_slope is not None

    def estimate(self) -> LinkEstimate:
        """Never above ``max_bandwidth_bps`` nor below ``min_bandwidth_bps``; during a slow spell, its slope."""
        rtt_s, slope = self._base()
        if self._spell_slope is not None:
            slope = self._clamp_slope(max(slope, self._spell_slope))
        return LinkEstimate(rtt_s=rtt_s, bandwidth_bps=1.0 / slope, samples=self.samples)

    def base_estimate(self) -> LinkEstimate:
        """The estimate without a slow spell: what to carry over (as a prior) past this estimator's life,
        since a stall is a moment and a prior lasts."""
        rtt_s, slope = self._base()
        return LinkEstimate(rtt_s=rtt_s, bandwidth_bps=1.0 / slope, samples=self.samples)


# Block sizes a forward's cost is kept at: every size a verification can feed (a draft of up to 32 tokens plus
# one), then prefills on a log scale. A forward is filed under the smallest bucket at least its size.
COST_BUCKETS: tuple[int, ...] = (*range(1, 34), 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072,
                                 4096, 6144, 8192, 12288, 16384, 32768, 65536, 131072)


class ForwardCostCurve:
    """Seconds of one forward pass as a function of the tokens it feeds: a measured curve, not a line.

    Forward costs are not linear in the block size (llama.cpp on the 1.5B model, idle: 33 / 49 / 76 / 158 /
    217 ms for 1 / 2 / 4 / 8 / 16 tokens; a GPU's are flat up to a few dozen tokens, then grow): one line
    fitted over prefills, one-token decodes and verifies together bends to negative intercepts. Here each
    block size keeps its own forgetting mean (seconds and tokens fed), and a query reads the curve through
    those means after a weighted isotonic fit (pool adjacent violators), so it is non-decreasing in the
    tokens fed and never negative, however noisy the samples. Between sizes it interpolates linearly; below
    the smallest measured size it takes that size's cost (a smaller block costs no more); past the largest
    it extends the last segment's slope (flat with a single size measured).
    """

    def __init__(self, forget: float = 0.9) -> None:
        self.forget = forget
        self._w: dict[int, float] = {}  # bucket -> weight, sum of tokens fed, sum of seconds
        self._sx: dict[int, float] = {}
        self._sy: dict[int, float] = {}
        self._points: list[tuple[float, float]] | None = None

    @property
    def count_weight(self) -> float:
        return sum(self._w.values())

    def observe(self, fed: float, seconds: float, weight: float = 1.0) -> None:
        if not (fed >= 1 and seconds >= 0 and math.isfinite(seconds)):
            return  # a forward of nothing, or a clock that went backwards, says nothing about costs
        bucket = COST_BUCKETS[min(bisect.bisect_left(COST_BUCKETS, fed), len(COST_BUCKETS) - 1)]
        f = self.forget
        self._w[bucket] = f * self._w.get(bucket, 0.0) + weight
        self._sx[bucket] = f * self._sx.get(bucket, 0.0) + weight * fed
        self._sy[bucket] = f * self._sy.get(bucket, 0.0) + weight * seconds
        self._points = None

    def replace(self, fed: float, seconds: float) -> None:
        """A deliberate measurement on an idle engine (a calibration): it replaces what the curve held at
        that size, which may have been timed under start-up contention and, at a size traffic seldom
        feeds, would otherwise linger for good."""
        if fed >= 1:
            bucket = COST_BUCKETS[min(bisect.bisect_left(COST_BUCKETS, fed), len(COST_BUCKETS) - 1)]
            for held in (self._w, self._sx, self._sy):
                held.pop(bucket, None)
        self.observe(fed, seconds)

    def points(self) -> list[tuple[float, float]]:
        """(tokens fed, seconds) through which the curve runs, non-decreasing in both."""
        if self._points is None:
            blocks: list[list[float]] = []  # [weight, sum x, sum y] of pooled buckets, by tokens fed
            for bucket in sorted(self._w):
                w = self._w[bucket]
                blocks.append([w, self._sx[bucket], self._sy[bucket]])
                while len(blocks) > 1 and blocks[-2][2] / blocks[-2][0] > blocks[-1][2] / blocks[-1][0]:
                    last = blocks.pop()
                    blocks[-1] = [a + b for a, b in zip(blocks[-1], last, strict=True)]
            self._points = [(sx / w, sy / w) for w, sx, sy in blocks]
        return self._points

    def seconds(self, fed: float) -> float | None:
        """The predicted seconds of a forward feeding ``fed`` tokens (None before any measurement)."""
        pts = self.points()
        if not pts:
            return None
        if fed <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            if fed <= x1:
                return y0 + (y1 - y0) * (fed - x0) / (x1 - x0) if x1 > x0 else y1
        if len(pts) == 1:
            return pts[0][1]
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return y1 + max(y1 - y0, 0.0) / max(x1 - x0, 1e-9) * (fed - x1)

    def export(self) -> list[list[float]]:
        return [[x, y] for x, y in self.points()]

    def restore(self, points: list[list[float]], weight: float = 2.0) -> None:
        """Saved points as a few observations each: new measurements soon dominate them."""
        for x, y in points:
            self.observe(float(x), float(y), weight=weight)
