"""The llama.cpp edge's forwards of many sessions in one ``llama_decode``, as llama-server's slots batch them.

A plain ``LlamaCppEngine`` runs one session's forward at a time behind its tier's lock: with four server-only
streams on one edge, each token of each stream is a decode of its own, and the streams share the engine's
speed four ways. A decode's cost grows far slower than its token count on a CPU (the weights are read once per
decode, whatever it feeds: the 1.5B at Q8 here, 1 / 2 / 4 / 8 tokens in 33 / 49 / 76 / 158 ms), so
``BatchingLlamaCppEngine`` scores every session that asks at about the same time in one decode, each token in
its own sequence of the unified KV cache.

Flat combining, no scheduler thread: a ``score`` puts its call on a pending list; if no thread leads, it leads:
takes every pending call and runs them all; the others wait for their results, and a call that came too late
for the running decode leads the next one. While one decode runs, the next one's calls gather. A stream comes
back for its next token a few milliseconds after its last (the edge hands the token out and asks again), so a
leader waits for the streams of the last decodes, at most ``GATHER_SHARE`` of a decode's time and
``MAX_GATHER_S``: otherwise the first stream back would decode alone and the streams would split into two
decodes a token. Verifies are not waited for (a device drafts and crosses the link before its next one), but
are batched with whatever is pending.

Only a decode holds the engine lock: appends, lengths and new sessions touch Python state alone (atomic
under the GIL, and never of a session whose forward is in the decode: its thread is waiting for it), so a
stream's bookkeeping between tokens does not wait for the next decode. Releasing a session frees KV cells,
which must not happen during a decode, so it takes the lock.

Every call's logits come from its own rows of the shared decode, so greedy output is the engine's own; the
quantized kernels' sums differ with the decode's width only in the last bits, so output differs from a lone
decode only at near-ties (tests/unit/test_engine_conformance.py measures both).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aiflow_ray.config import SamplingConfig
from aiflow_ray.engines.base import DraftOutput, ScoreOutput
from aiflow_ray.engines.llama_cpp import N_BATCH, LlamaCppEngine, scores_of
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

GATHER_SHARE = 0.2  # of the last decode's time, the longest a holder waits for the streams of that decode
MAX_GATHER_S = 0.01


@dataclass(eq=False)
class _Call:
    session_id: str
    draft: list[int]
    sampling: SamplingConfig
    with_logprobs: bool
    result: ScoreOutput | None = None
    error: BaseException | None = None

    @property
    def settled(self) -> bool:
        return self.result is not None or self.error is not None


class BatchingLlamaCppEngine(LlamaCppEngine):
    """A ``LlamaCppEngine`` any thread may call; concurrent scores share decodes (module docstring)."""

    concurrent = True  # the tier takes no lock around it (serve/common.py EngineGate)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.RLock()  # the llama context, the sequences and their cells
        # Guards _pending and _leading; notified when a call joins or a decode's calls are settled.
        self._arrived = threading.Condition()
        self._pending: list[_Call] = []
        self._leading = False  # a thread is gathering or running calls
        # Sessions whose last score asked for one token (a stream's step: it asks again at once), with when it was
        # answered.
        self._streams: dict[str, float] = {}
        self._last_decode_s = 0.0
        self.decodes = 0  # shared or not: with `calls`, how well scores combine
        self.calls = 0

    # -- entry points that free or reuse cells: one at a time, never during a decode -------------
    def release(self, session_id: str) -> None:
        if not self.has_session(session_id):
            return
        with self._lock:
            super().release(session_id)
            self._streams.pop(session_id, None)

    def draft(self, session_id: str, k: int, sampling: SamplingConfig, rng: np.random.Generator | None = None
              ) -> DraftOutput:
        with self._lock:
            return super().draft(session_id, k, sampling, rng)

    def decode_rows(self, feeds: list[tuple[int, list[int], int]], outputs_last: int = 1) -> np.ndarray:
        with self._lock:
            return super().decode_rows(feeds, outputs_last)

    def claim_all_sequences(self) -> list[int]:
        with self._lock:
            return super().claim_all_sequences()

    # -- scores, combined ------------------------------------------------------------------------
    def score(self, session_id: str, draft_ids: Sequence[int], sampling: SamplingConfig,
              with_logprobs: bool = False) -> ScoreOutput:
        call = _Call(session_id, [int(t) for t in draft_ids], sampling, with_logprobs)
        with self._arrived:
            self._pending.append(call)
            self._arrived.notify_all()
            while not call.settled and self._leading:  # a call taken by the running decode is settled by it
                self._arrived.wait()
            if not call.settled:
                self._leading = True
        if not call.settled:  # nobody took it: this thread runs everything pending
            try:
                self._gather()
                with self._arrived:
                    calls, self._pending = self._pending, []
                with self._lock:
                    self._run(calls)
            finally:
                with self._arrived:
                    self._leading = False
                    self._arrived.notify_all()
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _gather(self) -> None:
        """Wait, briefly, for the streams answered by the last decodes to ask again."""
        now = time.perf_counter()
        recent_s = 2 * self._last_decode_s + MAX_GATHER_S  # two decodes: streams that went in the one before
        expected = {sid for sid, at in self._streams.items() if now - at < recent_s}
        if len(expected) < 2:
            return
        deadline = time.perf_counter() + min(GATHER_SHARE * self._last_decode_s, MAX_GATHER_S)
        with self._arrived:
            while expected - {c.session_id for c in self._pending}:
                left_s = deadline - time.perf_counter()
                if left_s <= 0:
                    return
                self._arrived.wait(left_s)

    def _run(self, calls: list[_Call]) -> None:
        try:
            self._run_batch(calls)
        except BaseException as exc:  # every call must settle, or its thread would take it for unclaimed
            for call in calls:
                if not call.settled:
                    call.error = exc
            raise
        finally:
            now = time.perf_counter()
            for call in calls:
                if call.draft or call.result is None:
                    self._streams.pop(call.session_id, None)
                else:
                    self._streams[call.session_id] = now
            for sid in [sid for sid, at in self._streams.items() if now - at > 1.0]:  # gone quiet
                del self._streams[sid]

    def _run_batch(self, calls: list[_Call]) -> None:
        keep = frozenset(c.session_id for c in calls)
        prepared: list[tuple[_Call, Any, int, list[int], int]] = []
        for call in calls:
            try:
                prepared.append((call, *self._prepare(call.session_id, call.draft, len(call.draft) + 1, keep)))
            except Exception as exc:  # this call's alone (its session gone): the others go on
                call.error = exc
        groups: list[list[tuple[_Call, Any, int, list[int], int]]] = []
        width = 0
        for item in prepared:
            fed = len(item[3]) - item[4]
            if not groups or width + fed > N_BATCH:
                groups.append([])
                width = 0
            groups[-1].append(item)
            width += fed
        for group in groups:
            self._decode_group(group, keep)

    def _decode_group(self, group: list[tuple[_Call, Any, int, list[int], int]], keep: frozenset[str]) -> None:
        started = time.perf_counter()
        outputs = [len(call.draft) + 1 for call, *_ in group]
        fed = sum(len(target) - agree for _, _, _, target, agree in group)
        self.decodes += 1
        self.calls += len(group)
        try:
            if len(group) == 1:  # a long prompt is fed in chunks
                call, session, seq, target, agree = group[0]
                self._feed_text(keep, seq, target[agree:], agree, outputs[0])
            else:
                self._decode([(seq, target[agree:], agree) for _, _, seq, target, agree in group], outputs, keep)
        except Exception as exc:
            if len(group) == 1:
                group[0][0].error = exc
                return
            # Out of cells with every other session evicted: each call on its own, evicting the others' KV.
            log.warning("a shared decode of %d sessions failed (%s): decoding them one by one", len(group), exc)
            for call, *_ in group:
                try:
                    call.result = scores_of(self._forward(call.session_id, call.draft, len(call.draft) + 1),
                                            call.sampling, call.with_logprobs, time.perf_counter())
                except Exception as one:
                    call.error = one
            return
        self._last_decode_s = time.perf_counter() - started
        rows = self._logits(sum(outputs))
        start = 0
        for i, ((call, session, _, target, _), count) in enumerate(zip(group, outputs, strict=True)):
            session.cached = target
            shared = None if len(group) == 1 else (fed if i == 0 else 0)
            call.result = scores_of(rows[start:start + count], call.sampling, call.with_logprobs, started, shared)
            start += count
