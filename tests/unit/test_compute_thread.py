"""Every engine computation of a process runs on one thread, whichever thread calls the engine
(engines/compute_thread.py: libgomp keeps a worker pool per calling thread, and several pools make it sleep at
every barrier). Checked on the HF engine (torch) and the llama.cpp engine, called from several threads."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from aiflow_ray.config import SamplingConfig
from aiflow_ray.engines.compute_thread import ComputeThread, shared_compute
from aiflow_ray.engines.loader import load_engine


def _from_threads(fn, count: int = 3) -> None:  # type: ignore[no-untyped-def]
    for _ in range(count):
        worker = threading.Thread(target=fn)
        worker.start()
        worker.join()


def test_the_hf_engine_computes_on_one_thread_and_scores_as_before() -> None:
    engine = load_engine("tiny-verifier", dtype="float32")
    seen: set[int] = set()
    # A hook runs where its module's __call__ does: a decoder layer's, inside the model's forward.
    layer = engine.model.model.layers[0]  # type: ignore[attr-defined]
    layer.register_forward_hook(lambda *_: seen.add(threading.get_ident()))
    ids = engine.encode_prompt("def add(a, b):", chat=False)
    scores: list[list[int]] = []

    def score() -> None:
        engine.open_session("s", ids)
        scores.append(engine.score("s", [ids[-1], ids[-1]], SamplingConfig()).greedy_ids)  # type: ignore[arg-type]
        engine.release("s")

    _from_threads(score)
    assert len(seen) == 1 and threading.get_ident() not in seen
    assert scores[0] == scores[1] == scores[2]


@pytest.mark.real_model
def test_the_llama_cpp_engine_computes_on_one_thread() -> None:
    engine = load_engine("qwen2.5-coder-0.5b-instruct", engine="llama_cpp", threads=2)
    seen: set[int] = set()

    class Spy:  # llama-cpp-python's bindings, with llama_decode noting the thread it runs on
        def __init__(self, real: object) -> None:
            self.real = real

        def __getattr__(self, name: str) -> object:
            return getattr(self.real, name)

        def llama_decode(self, *args: object) -> int:
            seen.add(threading.get_ident())
            return int(self.real.llama_decode(*args))  # type: ignore[attr-defined]

    engine._ll = Spy(engine._ll)  # type: ignore[attr-defined]
    ids = engine.encode_prompt("def add(a, b):", chat=False)

    def draft() -> None:
        engine.open_session("s", ids)
        engine.draft("s", 2, SamplingConfig())
        engine.release("s")

    _from_threads(draft)
    assert len(seen) == 1 and threading.get_ident() not in seen
    # The HF engine's thread is the same: one OpenMP pool for the process.
    hf_seen: set[int] = set()
    hf = load_engine("tiny-verifier", dtype="float32")
    hf.model.model.layers[0].register_forward_hook(  # type: ignore[attr-defined]
        lambda *_: hf_seen.add(threading.get_ident()))
    hf.open_session("h", hf.encode_prompt("x = 1", chat=False))
    hf.score("h", [], SamplingConfig())
    assert hf_seen == seen
    assert shared_compute() is shared_compute()


def test_the_thread_ends_with_its_owner() -> None:
    owner = {"compute": ComputeThread("owned")}

    def nested() -> int:  # a computation that computes again runs in place
        return owner["compute"].run(lambda: 7)

    def alive() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("compute-owned")]

    assert owner["compute"].run(nested) == 7
    assert len(alive()) == 1
    owner.clear()
    gc.collect()
    for _ in range(100):
        if not alive():
            break
        threading.Event().wait(0.02)
    assert not alive()


def _timed_computations(lock: str, count: int, out: multiprocessing.Queue[list[tuple[float, float]]]) -> None:
    import time

    compute = ComputeThread("host-lock", lock)

    def work() -> tuple[float, float]:
        started = time.monotonic()
        time.sleep(0.02)  # a computation's time on the CPUs
        return started, time.monotonic()

    out.put([compute.run(work) for _ in range(count)])


def test_processes_sharing_a_host_compute_in_turns(tmp_path: Path) -> None:
    """With a host lock (the local cluster sets AIFLOW_HOST_COMPUTE_LOCK), two processes' computations never
    overlap, and both progress: their OpenMP pools would otherwise spin against each other."""
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[list[tuple[float, float]]] = ctx.Queue()
    lock = str(tmp_path / "compute.lock")
    procs = [ctx.Process(target=_timed_computations, args=(lock, 10, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    first, second = out.get(timeout=60), out.get(timeout=60)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert len(first) == len(second) == 10
    for a_start, a_end in first:
        for b_start, b_end in second:
            assert a_end <= b_start or b_end <= a_start, "two processes computed at once"


def test_an_exclusive_hold_keeps_other_holders_of_the_host_lock_out_between_computations(tmp_path: Path) -> None:
    # Two compute threads on one lock file contend as two processes do (an flock belongs to its open file).
    # A calibration's timing spans several computations: another tier's must not run in between.
    lock = tmp_path / "compute.lock"
    ours, theirs = ComputeThread("ours", lock), ComputeThread("theirs", lock)
    order: list[str] = []
    inside = threading.Event()

    def other() -> None:
        inside.wait(5)
        theirs.run(order.append, "theirs")

    thread = threading.Thread(target=other)
    thread.start()
    with ours.exclusive():
        ours.run(order.append, "first")
        inside.set()
        time.sleep(0.3)  # the other holder asks for its turn meanwhile
        ours.run(order.append, "second")
    thread.join(5)
    assert order == ["first", "second", "theirs"]
    # Without the hold, the other holder's turn comes between two computations.
    order.clear()
    inside.clear()
    thread = threading.Thread(target=other)
    thread.start()
    ours.run(order.append, "first")
    inside.set()
    time.sleep(0.3)
    ours.run(order.append, "second")
    thread.join(5)
    assert order == ["first", "theirs", "second"]
