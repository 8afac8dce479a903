"""Deadlines and fail-over for calls between tiers.

Every call from one tier to another has a deadline: a replica whose node died can leave a call
waiting forever (its raylet gone, the actor not yet declared dead), and a client must never wait
past its own deadline for that. A call that fails because its replica died, was unreachable, was
overloaded or missed the deadline raises ``TierUnavailable``: the caller may retry it on another
replica (the session protocol allows it: the device resends its context), and otherwise answers
503 + Retry-After. Any other exception is a bug and propagates as one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ray.exceptions import (
    GetTimeoutError,
    LocalRayletDiedError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    TaskCancelledError,
    WorkerCrashedError,
)
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from aiflow_ray.errors import TierUnavailable
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

T = TypeVar("T")

# Failures of the replica or the cluster rather than of the request: retrying elsewhere may succeed.
RETRYABLE: tuple[type[BaseException], ...] = (
    RayActorError, WorkerCrashedError, NodeDiedError, LocalRayletDiedError, ObjectLostError, GetTimeoutError,
    TimeoutError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError,
)


def is_retryable(exc: BaseException) -> bool:
    # A cancelled call is the caller's own doing (the client went away), not a tier failure.
    return isinstance(exc, RETRYABLE) and not isinstance(exc, TaskCancelledError)


def describe(exc: BaseException) -> str:
    """A short reason for logs and traces: the exception's class, never its (possibly long) message."""
    return "deadline missed" if isinstance(exc, TimeoutError) else type(exc).__name__


def call(tier: str, response: Any, timeout_s: float) -> Any:
    """Wait for a Serve ``DeploymentResponse`` at most ``timeout_s``; a tier failure becomes ``TierUnavailable``
    and the abandoned call is cancelled, so a replica that is merely slow stops working on it."""
    try:
        return response.result(timeout_s=timeout_s)
    except Exception as exc:
        if not is_retryable(exc):
            raise
        cancel = getattr(response, "cancel", None)
        if cancel is not None:
            try:
                cancel()
            except Exception as cancel_exc:  # the replica is gone: nothing to cancel
                log.debug("cancelling an abandoned call failed: %s", describe(cancel_exc))
        raise TierUnavailable(tier, describe(exc)) from exc


def with_failover(tier: str, attempt: Callable[[], T], deadline: float, backoff_s: float = 0.25,
                  max_attempts: int = 4, on_retry: Callable[[TierUnavailable], None] | None = None) -> T:
    """Run ``attempt`` until it succeeds, ``max_attempts`` are spent, or the monotonic ``deadline`` passes.

    Backs off between attempts (doubling), so that Serve's handle learns that a replica died (it drops
    it on the failed call) or a replacement starts, instead of hammering the same dead replica.
    """
    delay_s = backoff_s
    for number in range(1, max_attempts + 1):
        try:
            return attempt()
        except TierUnavailable as exc:
            left_s = deadline - time.monotonic()
            if number == max_attempts or left_s <= delay_s:
                raise
            log.warning("%s call failed (%s); retrying, attempt %d of %d", tier, exc.reason, number + 1,
                        max_attempts)
            if on_retry is not None:
                on_retry(exc)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)
    raise AssertionError("unreachable")


_END = object()


def iterate(tier: str, responses: Any, item_timeout_s: float) -> Iterator[Any]:
    """Iterate a streaming Serve response, waiting at most ``item_timeout_s`` for each item.

    Serve's synchronous stream iteration has no timeout, so a reader thread feeds a queue and the
    caller waits on the queue. A tier failure or a missed deadline raises ``TierUnavailable`` after
    cancelling the stream (which also ends the reader thread).
    """
    items: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for item in responses:
                items.put(item)
            items.put(_END)
        except BaseException as exc:  # handed to the consumer, which decides
            items.put(exc)

    threading.Thread(target=read, name=f"aiflow-{tier}-stream", daemon=True).start()
    try:
        while True:
            try:
                item = items.get(timeout=item_timeout_s)
            except queue.Empty:
                raise TierUnavailable(tier, "deadline missed") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                if is_retryable(item):
                    raise TierUnavailable(tier, describe(item)) from item
                raise item
            yield item
    finally:
        try:
            responses.cancel()  # a no-op when the stream completed; stops the tier when we gave up
        except Exception as exc:
            log.debug("cancelling a stream failed: %s", describe(exc))
