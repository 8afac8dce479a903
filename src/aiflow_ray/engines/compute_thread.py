"""One thread for all of a process's engine computation (OpenMP), whichever thread calls an engine.

llama.cpp's CPU backend (as `make install` builds it) and torch both parallelise with OpenMP, and libgomp keeps
a pool of worker threads for every thread that has ever started a parallel region, for as long as that thread
lives. A Serve replica calls its engine from whichever thread its executor hands out, and those threads live
on, so a replica soon holds several pools. Once they hold more threads than the machine has CPUs, libgomp
stops spinning at a barrier and sleeps at once (it assumes the CPUs are oversubscribed), and ggml meets about
200 barriers a token: every one a futex sleep and wake. Measured on a 2-CPU host (0.5B model, llama.cpp, 2
threads): 35 ms a token decoding from one thread; 62 ms after three other live threads had decoded, its two
threads sleeping 30,000 times each over 128 tokens (10 before). The served device replica showed the same:
26,000 sleeps a thread, the machine 18% idle while it decoded, 40-50 ms a token. Funnelling every computation
of a process through one thread keeps one pool, whatever calls it. torch's CPU kernels use OpenMP the same
way (a bare HF decode after three other live threads: 10,000 sleeps a thread for 32 tokens, 83 from one
thread), so the HF engines' modules compute there too (``on_compute_thread``). One thread for the process, not
one per engine: two engines with a thread each are two pools again (a second engine's decode slept 13,000 times
in 64 tokens), and engines in one process take turns on the CPUs anyway.

Engines of different processes on one host take turns too, where the host says so (``AIFLOW_HOST_COMPUTE_LOCK``,
set by the local cluster, whose tiers are processes on one machine): each computation holds an ``flock`` on a
file of the host's. Two OpenMP pools each sized to the whole machine, computing at once, spin at their
barriers while the other pool holds the CPUs: on a 2-CPU host, a 1.5B decoding beside a 0.5B took 162 ms a
token instead of 41 (the 0.5B 79 instead of 22), and both finished their work in 11.7-12.5 s; taking turns
decode by decode, the same work took 3.4-4.7 s (measured 2026-12-07). The device's drafts, the edge's verifies
and another application's forwards then interleave a decode at a time. A process that dies drops its lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A one-thread executor that knows its thread; engines use the process's (``shared_compute``). The thread
    ends when the object is collected, its OpenMP pool with it."""

    def __init__(self, name: str, host_lock: str | os.PathLike[str] | None = None) -> None:
        """``host_lock``: a file whose ``flock`` every computation holds (processes sharing a host's CPUs)."""
        # The worker keeps its initializer: a list's method, so that the thread holds no reference to this object.
        self._ident: list[int] = []
        self._host_fd = os.open(host_lock, os.O_RDWR | os.O_CREAT, 0o600) if host_lock is not None else None
        self._held = False  # the host lock is held across computations (``exclusive``)
        self._exclusive = threading.Lock()  # one holder at a time: the first to leave would end the other's hold
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{name}"[:15],
                                        initializer=_record_ident, initargs=(self._ident,))

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine's thread; the caller waits (without the GIL) for its result."""
        if self._ident and threading.get_ident() == self._ident[0]:  # already there: a forward calling a child
            return fn(*args)
        if self._host_fd is None:
            return self._pool.submit(fn, *args).result()
        return self._pool.submit(self._holding, fn, args).result()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the host's lock across every computation inside: a timing of this process's own compute, without
        other processes' turns in between (tiers calibrating at once at start-up otherwise time each other's
        forwards too). Taken and given back on the compute thread, between two computations, since an ``flock``
        belongs to the open file, which that thread's computations lock and unlock. Without a host lock:
        nothing."""
        if self._host_fd is None or (self._ident and threading.get_ident() == self._ident[0]):
            yield
            return
        with self._exclusive:
            self._pool.submit(self._hold, True).result()
            try:
                yield
            finally:
                self._pool.submit(self._hold, False).result()

    def _hold(self, on: bool) -> None:
        assert self._host_fd is not None
        if on and not self._held:
            fcntl.flock(self._host_fd, fcntl.LOCK_EX)
        elif not on and self._held:
            fcntl.flock(self._host_fd, fcntl.LOCK_UN)
        self._held = on

    def _holding(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        if self._held:
            return fn(*args)
        assert self._host_fd is not None
        fcntl.flock(self._host_fd, fcntl.LOCK_EX)
        try:
            return fn(*args)
        finally:
            fcntl.flock(self._host_fd, fcntl.LOCK_UN)

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
        fd = getattr(self, "_host_fd", None)
        if fd is not None:
            os.close(fd)


def _record_ident(holder: list[int]) -> None:
    holder.append(threading.get_ident())


def on_compute_thread(model: Any, compute: ComputeThread) -> None:
    """Make a torch model compute on ``compute``'s thread: its ``forward``, its children's and grandchildren's
    (the vision tower, the projector, the language model: what an engine calls directly) and the
    ``get_image_features`` of its inner model. Grad mode is per thread, so each call runs under
    ``inference_mode`` there; calls made on that thread (a forward calling its children) run directly."""
    import torch

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            def run() -> Any:
                with torch.inference_mode():
                    return fn(*args, **kwargs)

            return compute.run(run)

        return call

    modules = [model, *model.children(), *(g for c in model.children() for g in c.children())]
    for module in modules:
        module.forward = wrap(module.forward)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "get_image_features"):
        inner.get_image_features = wrap(inner.get_image_features)


_shared: ComputeThread | None = None
_shared_pid = 0
_shared_lock = threading.Lock()


def shared_compute() -> ComputeThread:
    """The process's compute thread, started on first use (again in a forked child, whose copy has no thread)."""
    global _shared, _shared_pid
    with _shared_lock:
        if _shared is None or _shared_pid != os.getpid():
            from aiflow_ray import envs

            _shared, _shared_pid = ComputeThread("engines", envs.host_compute_lock()), os.getpid()
        return _shared
