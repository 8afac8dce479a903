"""Pieces shared by the tier servers: engine loading, torch threads, the router handle, load reports."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal

from aiflow_ray.config import AppArgs, TierName
from aiflow_ray.engines.base import Engine
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.routing.messages import LoadReport

log = get_logger(__name__)

# An idle drafter or verifier re-times itself this often (and this long after its last request): traffic that
# went elsewhere corrects nothing, so an estimate of a path no request takes would otherwise never move. Not
# more often: a re-timing is three rounds of forwards up to a 128-token prefill (seconds of both cores for the
# default verifier, none of it interruptible mid-forward), and once a minute it was a third of an idle local
# cluster's CPU use and, when a request arrived during its prefill, up to 1.8 s of that request's TTFT. The
# contended start-up timing is redone sooner, by the quieter-node rule below.
RECALIBRATE_IDLE_S = 900.0
# Sooner than that when the calibration itself was contended: when the node's other processes now keep a share
# of its CPUs at least this much smaller than while it ran (every tier loading its model at start-up), it is
# re-timed as soon as the replica has been idle QUIET_IDLE_S. A share, not a threshold: an idle local cluster's
# own background (Serve's controller, agents, replicas' reports) keeps about a quarter of 2 CPUs busy.
QUIETER_BY_SHARE = 0.15
QUIET_IDLE_S = 5.0


def retime_due(idle_s: float, since_timed_s: float, contended_share: float, others_now: float) -> bool:
    """Whether a drafter or verifier idle for ``idle_s`` should re-time its costs now: its last timing
    (``since_timed_s`` ago) ran while other processes kept ``contended_share`` of the CPUs and they now keep much
    less (``others_now``); or it has been idle, and untimed, for RECALIBRATE_IDLE_S: with requests going elsewhere
    no traffic may come to correct the estimate."""
    if idle_s < QUIET_IDLE_S:
        return False
    if contended_share - others_now >= QUIETER_BY_SHARE:
        return True
    return min(idle_s, since_timed_s) >= RECALIBRATE_IDLE_S


class CpuShare:
    """How much of the node's CPUs other processes used between two calls (psutil's counters): the node's busy
    CPU seconds less this process's own, over the wall time and the CPU count."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        self._cpus = psutil.cpu_count() or 1
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        times = self._psutil.cpu_times()
        idle_s = times.idle + getattr(times, "iowait", 0.0)
        own = self._process.cpu_times()
        return time.monotonic(), sum(times) - idle_s - getattr(times, "guest", 0.0) - getattr(
            times, "guest_nice", 0.0), own.user + own.system

    def others_share(self) -> float:
        """Share (0-1) of the node's CPUs that other processes kept busy since the last call."""
        now = self._sample()
        (then_t, then_busy, then_own), self._mark = self._mark, now
        wall_s = now[0] - then_t
        if wall_s <= 0:
            return 0.0
        others_s = (now[1] - then_busy) - (now[2] - then_own)
        return min(1.0, max(0.0, others_s / (wall_s * self._cpus)))


def configure_threads(threads: int | None) -> int:
    """A replica's compute threads: the tier's setting, else AIFLOW_THREADS, else all cores. Torch's are set
    here; llama.cpp's are passed to its context.

    Ray sets OMP_NUM_THREADS to a replica's num_cpus (1 by default), which torch obeys; a verifier on
    one thread of a multi-core node is several times slower than it needs to be.
    """
    import os

    import torch

    from aiflow_ray import envs

    count = threads or envs.threads() or os.cpu_count() or 1
    torch.set_num_threads(count)
    return count


def tier_engine(args: AppArgs, tier: TierName, role: Literal["drafter", "verifier"], engine: Engine | None) -> Engine:
    """The tier's engine: the injected one (tests), else the configured model, on the tier's runtime, with
    the tier's threads."""
    settings = args.tier(tier)
    threads = configure_threads(settings.threads)
    if engine is not None:
        return engine
    from aiflow_ray.engines.loader import load_engine

    pair = args.model_pair()
    return load_engine(pair.drafter if role == "drafter" else pair.verifier, pair.dtype, pair.device,
                       engine=settings.engine, threads=threads, beams=tier == "cloud", vllm=settings.vllm,
                       shared_decodes=tier in ("edge", "device") and settings.shared_decodes)


def router_handle(args: AppArgs) -> Any:
    """The app's Router: a single-replica deployment, so its lifetime is the application's."""
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=args.name)


class LoadTracker:
    """Counts a replica's queued and ongoing work and pushes it, with recent service times, to the router.

    A request is *queued* from the moment the replica admits it (``admitted``) until it holds the
    engine (``busy``), then *ongoing*: the router sees a queue forming behind the engine lock, not only
    how many requests the replica holds. ``service_samples`` is the replica's own record of (tokens
    fed, seconds) per forward; each report drains it, so the router learns compute costs from every
    path, including server-only and the start-up calibration, without a per-request call.
    """

    MAX_SAMPLES_PER_REPORT = 64

    def __init__(self, tier: TierName, args: AppArgs, service_samples: deque[tuple[int, float]] | None = None,
                 router: Any = None, replica_id: Callable[[], str] | None = None,
                 calibration_samples: deque[tuple[int, float]] | None = None) -> None:
        self.tier = tier
        self.args = args
        self.capacity = args.tier(tier).max_ongoing_requests
        self.service_samples = service_samples
        self.calibration_samples = calibration_samples
        self.last_active_at = time.monotonic()  # when a request last left the replica
        self.admitted_count = 0
        self.busy_count = 0
        self._router = router
        self._replica_id = replica_id
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._report_forever())

    @property
    def ongoing(self) -> int:
        return self.busy_count

    @property
    def queued(self) -> int:
        return self.admitted_count - self.busy_count

    @contextlib.contextmanager
    def _counted(self, attr: str) -> Iterator[None]:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + 1)
        try:
            yield
        finally:
            with self._lock:
                setattr(self, attr, getattr(self, attr) - 1)
                self.last_active_at = time.monotonic()

    def admitted(self) -> contextlib.AbstractContextManager[None]:
        return self._counted("admitted_count")

    def busy(self) -> contextlib.AbstractContextManager[None]:
        """Inside ``admitted``: the request holds the engine now."""
        return self._counted("busy_count")

    @property
    def idle_s(self) -> float:
        """Seconds since the replica last held a request (0 while it holds one)."""
        return 0.0 if self.admitted_count else time.monotonic() - self.last_active_at

    def report(self, pending: list[tuple[int, float]],
               calibration: list[tuple[int, float]] | None = None) -> LoadReport:
        replica = self._replica_id() if self._replica_id else _serve_replica_id()
        return LoadReport(tier=self.tier, replica=replica, ongoing=self.ongoing, queued=max(self.queued, 0),
                          capacity=self.capacity, service_samples=tuple(pending),
                          calibration_samples=tuple(calibration or ()), node_id=_node_id())

    async def _report_forever(self) -> None:
        router = self._router
        pending: list[tuple[int, float]] = []
        calibration: list[tuple[int, float]] = []
        while True:
            while self.service_samples and len(pending) < self.MAX_SAMPLES_PER_REPORT:
                pending.append(self.service_samples.popleft())
            while self.calibration_samples:
                calibration.append(self.calibration_samples.popleft())
            try:
                router = router or router_handle(self.args)
                await router.report_load.remote(self.report(pending, calibration))
                pending, calibration = [], []
            except Exception as exc:  # the router may not exist yet during start-up
                router = self._router
                log.debug("load report failed: %s", exc)
            await asyncio.sleep(self.args.router.load_report_period_s)


def _node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""


def _serve_replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)


class EngineGate:
    """Runs a replica's engine work off its event loop, in a pool of its own.

    Engines that are not thread-safe (HF, llama.cpp: one forward at a time) run behind one lock.
    Engines that batch (``concurrent = True``: vLLM, the edge's llama.cpp) run without it: every admitted
    call gets a thread, so the calls of different sessions are in the engine together and share its steps. The pool is
    sized to the replica's ``max_ongoing_requests`` (asyncio's default pool has cores + 4 threads, which
    on a 2-core node would cap a vLLM edge at 6 concurrent verifies).
    """

    def __init__(self, engine: Any, workers: int, load: LoadTracker, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.concurrent = bool(getattr(engine, "concurrent", False))
        self._lock: contextlib.AbstractContextManager[Any] = (
            contextlib.nullcontext() if self.concurrent else threading.Lock())
        self._pool = ThreadPoolExecutor(max_workers=workers + 2, thread_name_prefix=f"{name}-engine")
        self._load = load

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        with self._lock, self._load.busy():
            return fn(*args)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with the engine, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn, args)
