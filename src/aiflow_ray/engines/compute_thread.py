"""One thread for all of an engine's OpenMP computation, whichever thread calls the engine.

llama.cpp's CPU backend (as `make install` builds it) and torch both parallelise with OpenMP, and libgomp keeps
a pool of worker threads for every thread that has ever started a parallel region, for as long as that thread
lives. A Serve replica calls its engine from whichever thread its executor hands out, and those threads live
on, so a replica soon holds several pools. Once they hold more threads than the machine has CPUs, libgomp
stops spinning at a barrier and sleeps at once (it assumes the CPUs are oversubscribed), and ggml meets about
200 barriers a token: every one a futex sleep and wake. Measured on a 2-CPU host (0.5B model, llama.cpp, 2
threads): 35 ms a token decoding from one thread; 62 ms after three other live threads had decoded, its two
threads sleeping 30,000 times each over 128 tokens (10 before). The served device replica showed the same:
26,000 sleeps a thread, the machine 18% idle while it decoded, 40-50 ms a token. Funnelling every computation
of an engine through one thread keeps one pool, whatever calls it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str) -> None:
        self._ident: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"compute-{name}"[:15],
                                        initializer=self._started)

    def _started(self) -> None:
        self._ident = threading.get_ident()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine's thread; the caller waits (without the GIL) for its result."""
        if threading.get_ident() == self._ident:  # already there: a computation that computes again
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False)
