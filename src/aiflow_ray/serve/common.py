"""Pieces shared by the tier servers: the router handle, load reporting, engine loading."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from aiflow_ray.logging_utils import get_logger
from aiflow_ray.serve.args import AppArgs

log = get_logger(__name__)


def router_handle(args: AppArgs) -> Any:
    """The app's Router: a single-replica deployment, so its lifetime is the application's."""
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=args.name)


class LoadTracker:
    """Counts a replica's ongoing/queued work and pushes it to the router periodically."""

    def __init__(self, tier: str, args: AppArgs, capacity: int) -> None:
        self.tier = tier
        self.args = args
        self.capacity = capacity
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
        while True:
            try:
                router = router or router_handle(self.args)
                await router.report_load.remote(self.tier, replica, self.ongoing, self.waiting, self.capacity)
            except Exception as exc:  # the router may not exist yet during start-up
                router = None
                log.debug("load report failed: %s", exc)
            await asyncio.sleep(self.args.router.load_report_period_s)
