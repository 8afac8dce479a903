"""How a generation survives a failing edge replica or link: retry budget, deadline, and whether the device
may finish alone. Free of Ray: transports raise ``TierUnavailable`` (and the link ``LinkTimeout``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiflow_ray.errors import TierUnavailable
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Resilience:
    """How a generation survives a failing edge replica or link (None: it does not, as in process).

    A failed or timed-out edge call is retried (``max_failovers`` times, backing off) with the context
    resent, which any replica can serve; the output is unchanged. When the small model's output is
    acceptable (``fallback``), a link stalled for ``link_timeout_s``, or an edge that fails again after a
    retry, ends the speculation and the device finishes on its own from the verified tokens.
    """

    deadline: float  # time.monotonic() by which the generation must end
    max_failovers: int = 4
    link_timeout_s: float | None = None  # a transfer stalled this long is an outage
    fallback: bool = False  # the small model's output is acceptable: finish on the device when the edge is lost
    backoff_s: float = 0.25
    # Asked before each retry: False when the cluster knows the edge is down (no live replica reports), so a
    # request stops retrying into a dead tier and answers 503 at once instead of at its deadline.
    edge_alive: Callable[[], bool] | None = None

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TierUnavailable("edge", "the request's deadline passed")

    def wait_before_retry(self, failovers: int, exc: TierUnavailable) -> None:
        """Sleep before retry number ``failovers``, or re-raise when retries or time are spent."""
        delay_s = min(self.backoff_s * 2 ** (failovers - 1), 2.0)
        if failovers > self.max_failovers or time.monotonic() + delay_s > self.deadline:
            raise exc
        if failovers > 1 and self.edge_alive is not None and not self.edge_alive():
            raise TierUnavailable(exc.tier, f"{exc.reason}; no live replica") from exc
        log.warning("edge call failed (%s); retry %d of %d with the context resent", exc.reason, failovers,
                    self.max_failovers)
        time.sleep(delay_s)
