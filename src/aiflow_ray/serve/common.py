"""Pieces shared by the tier servers: the router handle, load reporting, engine loading."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any

from aiflow_ray.logging_utils import get_logger
from aiflow_ray.serve.args import AppArgs

log = get_logger(__name__)


def configure_torch_threads(threads: int | None) -> int:
    """Set torch's intra-op threads for a replica: the tier's setting, else AIFLOW_TORCH_THREADS, else all cores.

    Ray sets OMP_NUM_THREADS to a replica's num_cpus (1 by default), which torch obeys; a verifier on
    one thread of a multi-core node is several times slower than it needs to be.
    """
    import os

    import torch

    from aiflow_ray import envs

    count = threads or envs.torch_threads() or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def router_handle(args: AppArgs) -> Any:
    """The app's Router: a single-replica deployment, so its lifetime is the application's."""
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=args.name)


class LoadTracker:
    """Counts a replica's ongoing/queued work and pushes it, with recent service times, to the router.

    ``service_samples`` is the replica's own record of (tokens fed, seconds) per forward; each report
    drains it, so the router learns compute costs from every path, including server-only and the
    start-up calibration, without a per-request call.
    """

    MAX_SAMPLES_PER_REPORT = 64

    def __init__(self, tier: str, args: AppArgs, capacity: int,
                 service_samples: deque[tuple[int, float]] | None = None) -> None:
        self.tier = tier
        self.args = args
        self.capacity = capacity
        self.service_samples = service_samples
        self.ongoing = 0
        self.waiting = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._report_forever())

    @contextlib.contextmanager
    def track(self) -> Any:
        with self._lock:
            self.ongoing += 1
        try:
            yield
        finally:
            with self._lock:
                self.ongoing -= 1

    async def _report_forever(self) -> None:
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id
        router = None
        pending: list[tuple[int, float]] = []
        while True:
            while self.service_samples and len(pending) < self.MAX_SAMPLES_PER_REPORT:
                pending.append(self.service_samples.popleft())
            try:
                router = router or router_handle(self.args)
                await router.report_load.remote(self.tier, replica, self.ongoing, self.waiting, self.capacity,
                                                pending)
                pending = []
            except Exception as exc:  # the router may not exist yet during start-up
                router = None
                log.debug("load report failed: %s", exc)
            await asyncio.sleep(self.args.router.load_report_period_s)
