"""Forwards of many sessions in one ``llama_decode``, as llama-server's slots batch them (the edge's and the device's
llama.cpp engine).

A plain ``LlamaCppEngine`` runs one session's forward at a time behind its tier's lock: with four server-only
streams on one edge, each token of each stream is a decode of its own, and the streams share the engine's
speed four ways; a device held its model for a request's whole generation, link round trips included. A
decode's cost grows slower than its token count (the 1.5B Q4_K_M on 2 cores: 1 / 2 / 4 / 8 tokens, of one
sequence or of several, in 33 / 55 / 95 / 230 ms), so ``BatchingLlamaCppEngine`` runs every forward that
sessions ask for at about the same time in one decode, each in its own sequence of the unified KV cache: an
edge's scores, a device's draft steps (``_forward``, which ``draft`` and ``score`` both call).

Flat combining, no scheduler thread: a forward puts its call on a pending list; if no thread leads, it leads:
takes every pending call and runs them all; the others wait for their results, and a call that came too late
for the running decode leads the next one. While one decode runs, the next one's calls gather. A stream comes
back for its next token a few milliseconds after its last (the edge hands the token out and asks again), so a
leader waits for the streams of the last decodes, at most ``GATHER_SHARE`` of a decode's time and
``MAX_GATHER_S``: otherwise the first stream back would decode alone and the streams would split into two
decodes a token. Verifies and a draft's later steps are not waited for (after a verify the device drafts, after
its last draft step it crosses the link), but are batched with whatever is pending.

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
from aiflow_ray.engines.base import ScoreOutput
from aiflow_ray.engines.llama_cpp import N_BATCH, LlamaCppEngine, scores_of
from aiflow_ray.logging_utils import get_logger

log = get_logger(__name__)

GATHER_SHARE = 0.2  # of the last decode's time, the longest a holder waits for the streams of that decode
MAX_GATHER_S = 0.01


@dataclass(eq=False)
class _Call:
    """One forward asked for: logits of the last ``outputs`` tokens of the session's committed ids + ``extra``."""

    session_id: str
    extra: list[int]
    outputs: int
    logits: np.ndarray | None = None  # [outputs, V] once run
    error: BaseException | None = None
    shared_tokens: int | None = None  # as ScoreOutput.shared_forward_tokens
    compute_s: float = 0.0

    @property
    def settled(self) -> bool:
        return self.logits is not None or self.error is not None


class BatchingLlamaCppEngine(LlamaCppEngine):
    """A ``LlamaCppEngine`` any thread may call; concurrent scores share decodes (module docstring)."""

    concurrent = True  # the tier takes no lock around it (serve/common.py EngineGate)
    shares_decodes = True  # the device runs its requests side by side on it (serve/device_server.py)

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

    def decode_rows(self, feeds: list[tuple[int, list[int], int]], outputs_last: int = 1) -> np.ndarray:
        with self._lock:
            return super().decode_rows(feeds, outputs_last)

    def claim_all_sequences(self) -> list[int]:
        with self._lock:
            return super().claim_all_sequences()

    # -- forwards, combined ----------------------------------------------------------------------
    def score(self, session_id: str, draft_ids: Sequence[int], sampling: SamplingConfig,
              with_logprobs: bool = False) -> ScoreOutput:
        draft = [int(t) for t in draft_ids]
        call = self._combined(_Call(session_id, draft, len(draft) + 1))
        assert call.logits is not None
        started = time.perf_counter() - call.compute_s  # compute_s: its decode's own time, not the wait for it
        return scores_of(call.logits, sampling, with_logprobs, started, call.shared_tokens)

    def _forward(self, session_id: str, extra: list[int], outputs: int) -> np.ndarray:
        """Every forward, a draft's steps included, joins whatever other sessions ask for at the same time."""
        call = self._combined(_Call(session_id, extra, outputs))
        assert call.logits is not None
        return call.logits

    def _combined(self, call: _Call) -> _Call:
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
        return call

    def _gather(self) -> None:
        """Wait, briefly, for the streams answered by the last decodes to ask again."""
        now = time.perf_counter()
        recent_s = 2 * self._last_decode_s + MAX_GATHER_S  # two decodes: streams that went in the one before
        # A copy first (atomic under the GIL): a release may change the dict while this thread reads it.
        expected = {sid for sid, at in dict(self._streams).items() if now - at < recent_s}
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
                # A one-token step on the committed ids (a server-only stream's, an on-device generation's, a
                # draft's first) asks again at once. A verify's device drafts first; a draft's later steps may be
                # its last (the device then crosses the link): not waited for.
                if call.outputs == 1 and not call.extra and call.logits is not None:
                    self._streams[call.session_id] = now
                else:
                    self._streams.pop(call.session_id, None)
            for sid in [sid for sid, at in self._streams.items() if now - at > 1.0]:  # gone quiet
                del self._streams[sid]

    def _run_batch(self, calls: list[_Call]) -> None:
        keep = frozenset(c.session_id for c in calls)
        prepared: list[tuple[_Call, Any, int, list[int], int]] = []
        for call in calls:
            try:
                prepared.append((call, *self._prepare(call.session_id, call.extra, call.outputs, keep)))
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
        outputs = [call.outputs for call, *_ in group]
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
                    call.logits = LlamaCppEngine._forward(self, call.session_id, call.extra, call.outputs)
                except Exception as one:
                    call.error = one
            return
        self._last_decode_s = time.perf_counter() - started
        rows = self._logits(sum(outputs))
        start = 0
        for i, ((call, session, _, target, _), count) in enumerate(zip(group, outputs, strict=True)):
            session.cached = target
            call.shared_tokens = None if len(group) == 1 else (fed if i == 0 else 0)
            call.compute_s = self._last_decode_s
            call.logits = rows[start:start + count]
            start += count
