"""Refusals: how a tier says no, as a value that crosses Ray hops intact.

A refusal is data, never an exception whose message someone parses: the router puts one on its
decision, the device tier returns one instead of a result, and the ingress turns it into an HTTP
error of one sentence (no traceback, no file path, no class name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """An HTTP status, one sentence for the client, the request field at fault (None when nothing the
    client sent is wrong), and when to retry (for 503s)."""

    status: int
    message: str
    field: str | None = None
    retry_after_s: int | None = None


class RefusedError(Exception):
    """Raised inside a tier to end a request with ``refusal``; caught at the tier's boundary."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


class TierUnavailable(RuntimeError):
    """A tier (or the link to it) did not answer in time, or its replica failed: retryable, on another replica
    or later. Raised by transports; the device tier fails over, and answers 503 + Retry-After when it cannot."""

    def __init__(self, tier: str, reason: str) -> None:
        super().__init__(f"the {tier} tier is unavailable ({reason})")
        self.tier = tier
        self.reason = reason


class CalibrationInterrupted(Exception):
    """A re-timing gave way to a request that arrived meanwhile; nothing of it was recorded."""


def give_way_if(stop: Callable[[], bool] | None) -> None:
    """Asked before each timing forward: raise ``CalibrationInterrupted`` when ``stop`` says a request waits."""
    if stop is not None and stop():
        raise CalibrationInterrupted("a request arrived")
