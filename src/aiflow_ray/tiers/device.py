"""The device drafter: runs the speculative loop against an edge verifier over a link.

One round: draft k tokens with the small model, send the draft (and the context when the edge does
not hold the session), receive (accepted count, correction/bonus token), commit them locally. The
device times every stage with the link's clock and feeds the draft-length policy. Greedy output is
the verifier's greedy output token for token, whatever the draft length, link or session losses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from aiflow_ray.config import SamplingConfig
from aiflow_ray.engines.base import Engine
from aiflow_ray.errors import TierUnavailable
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network import wire
from aiflow_ray.network.link import Clock, DuplexLink, LinkTimeout, RealClock
from aiflow_ray.speculative.policy import DraftLenPolicy, RoundFeedback
from aiflow_ray.speculative.stats import SpecStats
from aiflow_ray.tiers.edge import EdgeVerifier
from aiflow_ray.tiers.images import PreparedImage, image_inputs, trace_images
from aiflow_ray.tiers.resilience import Resilience
from aiflow_ray.tiers.trace import Trace

log = get_logger(__name__)

MAX_CONTEXT_RESENDS = 8


class EdgeError(RuntimeError):
    """The edge answered with an error or kept losing the session."""


# Called with the tokens a round (or step) emitted and their logprobs when asked for; may raise to stop.
OnRound = Callable[[list[int], "wire.Logprobs | None"], None]


class Transport(Protocol):
    """Device <-> edge: every payload crosses ``link`` (emulated here, the real network elsewhere)."""

    clock: Clock
    link: DuplexLink

    def exchange(self, payload: bytes, link_timeout_s: float | None = None) -> bytes:
        """One request and its reply; raises ``LinkTimeout`` when a transfer stalls past ``link_timeout_s`` and
        ``TierUnavailable`` when the edge fails or misses its deadline."""
        ...

    def notify(self, payload: bytes) -> None: ...

    def stream(self, payload: bytes, session_bound: bool = False) -> Iterator[tuple[bytes, float]]:
        """The reply messages of a GENERATE, each with its arrival time. ``session_bound``: the request
        continues a session, so it must reach the replica that holds it."""
        ...


class InProcessTransport:
    """Device <-> edge in one process, every payload passing the emulated link."""

    def __init__(self, edge: EdgeVerifier, link: DuplexLink) -> None:
        self.edge = edge
        self.link = link
        self.clock = link.clock

    def exchange(self, payload: bytes, link_timeout_s: float | None = None) -> bytes:
        self.link.up.transfer(len(payload), timeout_s=link_timeout_s)
        reply = self.edge.handle(payload)
        self.link.down.transfer(len(reply), timeout_s=link_timeout_s)
        return reply

    def notify(self, payload: bytes) -> None:
        # Fire and forget (session release): counted on the link but nobody waits for it.
        self.link.up.schedule(len(payload))
        self.edge.handle(payload)

    def stream(self, payload: bytes, session_bound: bool = False) -> Iterator[tuple[bytes, float]]:
        """Yield (message, arrival time): the edge keeps computing while earlier tokens travel."""
        self.link.up.transfer(len(payload))
        for message in self.edge.generate_stream(payload):
            yield message, self.link.down.schedule(len(message))


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    trace: Trace
    stats: SpecStats | None = None
    prompt_tokens: int = 0
    logprobs: wire.Logprobs | None = None  # [len(token_ids)] when asked for, from the verifier
    # A speculative request that switched path: the rest is the edge's to decode (server_only), then
    # ``continued`` gives the whole result.
    continuation: Continuation | None = None

    def continued(self, decode: Callable[[list[int]], str]) -> GenerationResult:
        assert self.continuation is not None
        cont = self.continuation
        cont.trace.finish()
        return GenerationResult(cont.out, decode(cont.out), cont.trace, self.stats, self.prompt_tokens,
                                wire.Logprobs.concat(cont.logprob_parts))


@dataclass
class Continuation:
    """A speculative request going on without drafts: the edge replica that holds its session decodes the
    rest and streams it, into the same output and trace (``server_only.generate_server_only``)."""

    session: bytes
    committed: int  # tokens the edge holds for the session
    out: list[int]
    trace: Trace
    started: float  # the request's start on the transport's clock
    logprob_parts: list[wire.Logprobs]


@dataclass(frozen=True)
class PathSwitch:
    """Re-deciding an auto-routed device-edge request at a round boundary: when its rounds after the prefill
    have emitted tokens more slowly than server-only was predicted to (``margin`` over ``server_only_tpot_s``,
    over at least ``after_rounds`` rounds), the rest is decoded by the edge alone (the result's
    ``continuation``). Both paths give the verifier's output, so the switch keeps greedy output exact and
    sampled output on the verifier's distribution."""

    server_only_tpot_s: float
    after_rounds: int = 3
    # Above 1: a prediction of server-only that is a little optimistic must not move a request that is about
    # as fast where it is.
    margin: float = 1.25
    min_left_tokens: int = 8  # fewer left: the switch's own round trip would not pay

    def due(self, later_rounds: int, pace_s: float, left_tokens: int) -> bool:
        """``pace_s``: seconds a token over the ``later_rounds`` rounds after the prefill."""
        if later_rounds < self.after_rounds or left_tokens < self.min_left_tokens:
            return False
        return pace_s > self.margin * self.server_only_tpot_s


def _truncate_at_eos(tokens: list[int], eos: frozenset[int], emitted_before: int, min_tokens: int
                     ) -> tuple[list[int], bool]:
    """Cut after the first end-of-sequence token that may end the output (see ``min_tokens``)."""
    for i, token in enumerate(tokens):
        if token in eos and emitted_before + i + 1 >= min_tokens:
            return tokens[: i + 1], True
    return tokens, False


class DeviceDrafter:
    def __init__(self, engine: Engine, seed: int | None = None) -> None:
        self.engine = engine
        self._rng = np.random.default_rng(seed)

    def _rng_for(self, sampling: SamplingConfig) -> np.random.Generator:
        return np.random.default_rng(sampling.seed) if sampling.seed is not None else self._rng

    # -- on-device ------------------------------------------------------------------------------
    def generate_local(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        clock: Clock | None = None,
        on_token: OnRound | None = None,
        min_tokens: int = 0,
        images: Sequence[PreparedImage] = (),
    ) -> GenerationResult:
        """The small model alone, no link."""
        clock = clock or RealClock()
        trace = Trace(path="on-device")
        trace_images(trace, images)
        trace.image_upload = "" if not images else "none"  # nothing crosses a link on the device
        rng = self._rng_for(sampling)
        sid = wire.new_session_id().hex()
        self.engine.open_session(sid, prompt_ids, image_inputs(images))
        started = clock.now()
        out: list[int] = []
        try:
            self._decode_alone(sid, out, max_new_tokens, sampling, rng, clock, started, trace, on_token, min_tokens)
        finally:
            self.engine.release(sid)
        trace.finish()
        return GenerationResult(out, self.engine.decode(out), trace, prompt_tokens=len(prompt_ids))

    # -- device-edge ----------------------------------------------------------------------------
    def generate_speculative(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig,
        policy: DraftLenPolicy,
        transport: Transport,
        on_round: OnRound | None = None,
        min_tokens: int = 0,
        logprobs: int | None = None,
        draft_top_k: int = 0,
        resilience: Resilience | None = None,
        images: Sequence[PreparedImage] = (),
        switch: PathSwitch | None = None,
    ) -> GenerationResult:
        """The speculative loop; ``draft_top_k`` is the sparse draft distribution's size when sampling (the
        policy prices the uplink with it), ``logprobs`` asks the verifier for its log-probabilities. ``images``
        cross the link with the context, once per edge session (again only when the edge lost it). ``switch``
        lets the request go on server-only when its rounds turn out slower than that path."""
        # Finishing on the device cannot give the verifier's log-probabilities.
        can_fall_back = resilience is not None and resilience.fallback and logprobs is None
        link_timeout_s = resilience.link_timeout_s if resilience is not None else None
        fell_back: str | None = None  # why the device finished on its own
        failovers = 0
        clock = transport.clock
        logprob_parts: list[wire.Logprobs] = []
        trace = Trace(path="device-edge")
        trace_images(trace, images)
        payloads = tuple(image.payload for image in images)
        stats = SpecStats()
        rng = self._rng_for(sampling)
        session = wire.new_session_id()
        sid = session.hex()
        self.engine.open_session(sid, prompt_ids, image_inputs(images))
        committed = len(prompt_ids)
        out: list[int] = []
        edge_has_session = False
        seq = 0
        started = clock.now()
        switched = False
        after_prefill: tuple[float, int] | None = None  # (time, tokens out) when the first round ended
        try:
            while len(out) < max_new_tokens:
                if resilience is not None:
                    resilience.check()
                round_start = clock.now()
                k = policy.next_draft_len(max_new_tokens - len(out), draft_top_k)
                draft = self.engine.draft(sid, k, sampling, rng) if k > 0 else None
                draft_ids = draft.token_ids if draft else []
                draft_s = draft.compute_s if draft else 0.0
                sampled = not sampling.greedy and k > 0
                resends = 0
                round_bytes = 0
                while True:
                    context = None if edge_has_session else np.asarray(
                        self.engine.session_tokens(sid), np.int32
                    )
                    req = wire.VerifyRequest(
                        header=wire.Header(wire.MsgType.VERIFY, session, seq),
                        base_len=committed,
                        draft_ids=np.asarray(draft_ids, np.int32),
                        context=context,
                        sampling=sampling if context is not None else None,
                        logprobs=logprobs if context is not None else None,
                        q_ids=draft.q_ids if sampled and draft else None,
                        q_probs=(draft.q_probs.astype(np.float32)
                                 if sampled and draft and draft.q_probs is not None else None),
                        images=payloads if context is not None else (),
                    )
                    payload = wire.encode_verify(req)
                    if context is not None:
                        trace.image_bytes_sent += sum(len(p.data) for p in payloads)
                    seq += 1
                    sent = clock.now()
                    try:
                        reply_bytes = transport.exchange(payload, link_timeout_s)
                    except (LinkTimeout, TierUnavailable) as exc:
                        if resilience is None:
                            raise
                        failure = exc if isinstance(exc, TierUnavailable) else TierUnavailable("edge", "link outage")
                        if isinstance(exc, LinkTimeout):
                            trace.link_outages.append([exc.num_bytes, exc.waited_s])
                        failovers += 1
                        # A stalled link will not carry a retry either; a failed replica gets one retry first.
                        if can_fall_back and (isinstance(exc, LinkTimeout) or failovers > 1):
                            fell_back = failure.reason
                            break
                        trace.failovers += 1
                        edge_has_session = False  # any replica can serve the retry: the context goes with it
                        resilience.wait_before_retry(failovers, failure)
                        continue
                    received = clock.now()
                    trace.bytes_up += len(payload)
                    trace.bytes_down += len(reply_bytes)
                    round_bytes += len(payload) + len(reply_bytes)
                    reply = wire.decode(reply_bytes)
                    if isinstance(reply, wire.ErrorMsg):
                        raise EdgeError(f"edge error {reply.code}: {reply.message}")
                    if not isinstance(reply, wire.VerifyResult):
                        raise EdgeError(f"unexpected reply {reply.header.type.name}")
                    if reply.status is wire.VerifyStatus.NEED_CONTEXT:
                        edge_has_session = False
                        resends += 1
                        trace.context_resends += 1
                        log.info("edge lost session %s; resending %d tokens of context", sid[:8], committed)
                        if resends > MAX_CONTEXT_RESENDS:
                            raise EdgeError("edge keeps losing the session")
                        continue
                    break
                if fell_back is not None:
                    break
                assert isinstance(reply, wire.VerifyResult)  # the loop above leaves only with one
                prefill = context is not None
                edge_has_session = True
                accepted, next_token = reply.num_accepted, reply.next_token
                if not 0 <= accepted <= len(draft_ids):
                    raise EdgeError(f"edge accepted {accepted} of {len(draft_ids)} draft tokens")
                emitted = [*draft_ids[:accepted], next_token]
                self.engine.append(sid, emitted)
                committed += len(emitted)
                stats.observe(len(draft_ids), accepted)
                emitted, hit_eos = _truncate_at_eos(emitted, self.engine.eos_token_ids, len(out), min_tokens)
                emitted = emitted[: max_new_tokens - len(out)]
                round_logprobs = None
                if logprobs is not None:
                    if reply.logprobs is None:
                        raise EdgeError("the edge sent no logprobs")
                    round_logprobs = reply.logprobs.head(len(emitted))
                    logprob_parts.append(round_logprobs)
                out.extend(emitted)
                now = clock.now()
                trace.token_times_s.extend([now - started] * len(emitted))
                verify_s = reply.verify_us / 1e6
                link_s = max((received - sent) - verify_s, 0.0)
                trace.rounds += 1
                trace.draft_lens.append(len(draft_ids))
                trace.accepted.append(accepted)
                trace.round_draft_s.append(draft_s)
                trace.round_verify_s.append(verify_s)
                trace.round_bytes.append(round_bytes)
                trace.round_link_s.append(link_s)
                trace.draft_s += draft_s
                trace.verify_s += verify_s
                trace.link_s += received - sent - verify_s
                policy.update(RoundFeedback(
                    num_drafted=len(draft_ids), num_accepted=accepted, draft_s=draft_s,
                    verify_s=verify_s, link_s=link_s, bytes_up=len(payload), bytes_down=len(reply_bytes),
                    other_s=(now - round_start) - draft_s - (received - sent), prefill=prefill,
                ))
                if on_round is not None:
                    on_round(emitted, round_logprobs)
                if hit_eos:
                    break
                if after_prefill is None:
                    after_prefill = (now, len(out))
                elif switch is not None:
                    pace_s = (now - after_prefill[0]) / max(len(out) - after_prefill[1], 1)
                    if switch.due(trace.rounds - 1, pace_s, max_new_tokens - len(out)):
                        trace.switched_at = len(out)
                        trace.switch_reason = (f"{1e3 * pace_s:.1f} ms a token over {trace.rounds - 1} rounds, "
                                               f"server-only predicted {1e3 * switch.server_only_tpot_s:.1f} ms")
                        log.info("session %s goes on server-only: %s", sid[:8], trace.switch_reason)
                        switched = True
                        edge_has_session = False  # kept for the edge's stream, which ends it there
                        break
            if fell_back is not None:
                log.warning("session %s: the edge is lost (%s); the device finishes the output", sid[:8], fell_back)
                trace.fallback, trace.fallback_at = fell_back, len(out)
                self._decode_alone(sid, out, max_new_tokens, sampling, rng, clock, started, trace, on_round,
                                     min_tokens)
        finally:
            self.engine.release(sid)
            if edge_has_session:
                release = wire.encode_release(wire.Release(wire.Header(wire.MsgType.RELEASE, session, seq)))
                trace.bytes_up += len(release)
                try:
                    transport.notify(release)
                except Exception as exc:  # the edge frees the session by LRU anyway
                    log.debug("could not release session %s: %s", sid[:8], type(exc).__name__)
        trace.acceptance_rate = stats.acceptance_rate
        trace.alpha = stats.alpha
        trace.policy = policy.describe()
        if switched:  # text, logprobs and the trace's figures come once the edge has streamed the rest
            return GenerationResult(out, "", trace, stats, len(prompt_ids),
                                    continuation=Continuation(session, committed, out, trace, started, logprob_parts))
        trace.finish()
        return GenerationResult(out, self.engine.decode(out), trace, stats, len(prompt_ids),
                                wire.Logprobs.concat(logprob_parts))

    def _decode_alone(self, sid: str, out: list[int], max_new_tokens: int, sampling: SamplingConfig,
                      rng: np.random.Generator, clock: Clock, started: float, trace: Trace,
                      on_round: OnRound | None, min_tokens: int) -> None:
        """Continue session ``sid`` with the small model alone, into ``out``: on-device generation, and the
        rest of a speculative one whose edge was lost (the session then holds the verified tokens)."""
        while len(out) < max_new_tokens:
            step = self.engine.draft(sid, 1, sampling, rng)
            token = step.token_ids[0]
            trace.draft_s += step.compute_s
            self.engine.append(sid, [token])
            out.append(token)
            trace.token_times_s.append(clock.now() - started)
            if on_round is not None:
                on_round([token], None)
            if token in self.engine.eos_token_ids and len(out) >= min_tokens:
                break
