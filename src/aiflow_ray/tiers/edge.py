"""The edge verifier: decodes wire messages, keeps per-session state, verifies drafts.

It never trusts the client's view of a session: a VERIFY without context for a session it does not
hold, or whose committed length differs from the device's, is answered NEED_CONTEXT; the device then
resends the context and the output is unchanged. Malformed payloads get an ERROR message, never an
exception across the link.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from aiflow_ray.config import SamplingConfig
from aiflow_ray.engines.base import Engine, ImageInput, ScoreOutput, SessionNotFound
from aiflow_ray.engines.compute_thread import shared_compute
from aiflow_ray.errors import give_way_if
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network import wire
from aiflow_ray.speculative.sampling import pick_logprobs
from aiflow_ray.speculative.verify import verify_greedy, verify_sampled
from aiflow_ray.tiers.images import receive_image
from aiflow_ray.vision.decode import ImageLimits

log = get_logger(__name__)

GREEDY = SamplingConfig()


@dataclass
class _SessionState:
    sampling: SamplingConfig
    rng: np.random.Generator
    logprobs: int | None  # alternatives per token to report, None = no logprobs
    # Committed tokens the engine has not computed yet: the whole context after a (re)start, then the one
    # token each verify appends. The next forward feeds these plus the draft: a service sample counts them,
    # so a session's first verify is filed as the prefill it is, not as a k-token verify.
    unfed: int = 1
    # Image tokens cost the vision encoder besides the forward: such a prefill is no sample of either.
    with_images: bool = False


def _logprobs(scores_logprobs: np.ndarray | None, chosen: list[int], top_n: int | None) -> wire.Logprobs | None:
    if top_n is None or scores_logprobs is None:
        return None
    return wire.Logprobs(*pick_logprobs(scores_logprobs, chosen, top_n))


class EdgeVerifier:
    def __init__(self, engine: Engine, max_sessions: int = 256, seed: int | None = None,
                 image_limits: ImageLimits | None = None, stream_interval_s: float = 0.0) -> None:
        """``stream_interval_s``: server-only tokens that come within this long of the last TOKENS message go
        in the next one (``tokens_messages``)."""
        self.engine = engine
        self.stream_interval_s = stream_interval_s
        self.max_sessions = max_sessions
        # Images that crossed the link are decoded as strictly as the device decoded the client's.
        self.image_limits = image_limits or ImageLimits()
        self._sessions: OrderedDict[bytes, _SessionState] = OrderedDict()
        self._seed_rng = np.random.default_rng(seed)
        # Guards the session table only, never a forward: an engine that batches (vLLM, llama.cpp's shared decodes)
        # verifies many sessions at once from the server's threads.
        self._lock = threading.Lock()
        self.context_requests = 0
        # (tokens fed, seconds) of recent forwards, drained by whoever reports service times.
        self.service_samples: deque[tuple[int, float]] = deque(maxlen=256)
        self.calibration_samples: deque[tuple[int, float]] = deque(maxlen=64)
        self.calibrated_at: float | None = None

    def calibrate(self, context_len: int = 16, draft_lens: tuple[int, ...] = (0, 3, 7),
                  prefill_len: int = 128, repeats: int = 3,
                  stop: Callable[[], bool] | None = None) -> list[tuple[int, float]]:
        """Time a few verifications and one prompt's prefill on scratch sessions, so the router has service
        times (and a TTFT) before traffic: the fastest of ``repeats`` each, since a replica calibrating at
        start-up shares the host with every other tier loading its model.

        The first forward warms the model up and is not recorded. ``stop`` is asked before every forward: when
        it says so (a request arrived while an idle replica re-timed), nothing is recorded and
        ``CalibrationInterrupted`` is raised, so the request waits for one forward, not for the whole timing (3
        prefills of 128 tokens: 12-15 s for the 1.5B on a slow 2-core host).
        """

        sid = "calibration"
        vocab = self.engine.vocab_size
        # Each timed forward holds the host's compute lock throughout (where tiers share one): this tier's cost,
        # not the turns of tiers calibrating beside it, which at start-up put TTFT predictions 2-14x too high.
        own = shared_compute().exclusive
        ids = [(7 * i + 11) % vocab for i in range(context_len + max(draft_lens) + 1)]
        best: dict[int, float] = {}
        try:
            self.engine.open_session(sid, ids[:context_len])
            self.engine.score(sid, [], GREEDY)
            for _ in range(repeats):
                for k in draft_lens:
                    give_way_if(stop)
                    length = self.engine.session_length(sid)
                    with own():
                        started = time.perf_counter()
                        self.engine.score(sid, ids[context_len : context_len + k], GREEDY)
                        best[k + 1] = min(best.get(k + 1, math.inf), time.perf_counter() - started)
                    self.engine.rollback(sid, length)
        finally:
            self.engine.release(sid)
        for repeat in range(repeats):
            # Text, not arbitrary ids (a VLM's image placeholders among them would be an image block without
            # an image), different each time: a prefix cache (vLLM's) must not shorten this prefill.
            text = "".join(f"def f{repeat}_{i}(x):\n    return x * {i + repeat}\n" for i in range(prefill_len))
            prompt = self.engine.encode_prompt(text, False)[:prefill_len]
            give_way_if(stop)
            try:
                with own():
                    started = time.perf_counter()
                    self.engine.open_session(sid, prompt)
                    self.engine.score(sid, [], GREEDY)
                    best[len(prompt)] = min(best.get(len(prompt), math.inf), time.perf_counter() - started)
            finally:
                self.engine.release(sid)
        samples = sorted(best.items())
        self.calibration_samples.extend(samples)
        self.calibrated_at = time.monotonic()
        return samples

    # -- sessions -------------------------------------------------------------------------------
    def _sid(self, session_id: bytes) -> str:
        return session_id.hex()

    def _images(self, context: list[int], payloads: tuple[wire.ImagePayload, ...]) -> list[ImageInput]:
        """The images a context's image blocks stand for, back from their link representation."""
        vision = self.engine.vision
        if vision is None:
            if payloads:
                raise wire.WireError(f"{self.engine.name} takes text only")
            return []
        digest = getattr(self.engine, "encoder_digest", None)
        images = [receive_image(p, vision, self.image_limits, digest) for p in payloads]
        check = getattr(self.engine, "check_image_blocks", None)
        count = getattr(self.engine, "image_tokens", None)
        if check is not None and count is not None:
            try:
                check(context, [count(image) for image in images])
            except ValueError as exc:
                raise wire.WireError(str(exc)) from None
        return images

    def _start(self, session_id: bytes, context: np.ndarray, sampling: SamplingConfig | None,
               logprobs: int | None = None, images: tuple[wire.ImagePayload, ...] = ()) -> _SessionState:
        self._check_ids(context, "context")
        ids = context.tolist()
        inputs = self._images(ids, images)
        sampling = sampling or GREEDY
        rng = np.random.default_rng(sampling.seed if sampling.seed is not None else self._seed_rng.integers(2**63))
        self.engine.open_session(self._sid(session_id), ids, inputs)
        with self._lock:
            state = self._sessions[session_id] = _SessionState(sampling, rng, logprobs, len(ids), bool(inputs))
            self._sessions.move_to_end(session_id)
            evicted = [self._sessions.popitem(last=False)[0] for _ in range(len(self._sessions) - self.max_sessions)]
        for old in evicted:
            # Evicting is safe: the device will be asked for the context again.
            self.engine.release(self._sid(old))
            log.info("evicted session %s (limit %d)", old.hex()[:8], self.max_sessions)
        return state

    def drop_session(self, session_id: bytes) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)
        self.engine.release(self._sid(session_id))

    def drop_all_sessions(self) -> None:
        for session_id in list(self._sessions):
            self.drop_session(session_id)

    def _check_ids(self, ids: np.ndarray, what: str) -> None:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.engine.vocab_size):
            raise wire.WireError(f"{what} holds token ids outside the vocabulary (0..{self.engine.vocab_size - 1})")

    # -- messages -------------------------------------------------------------------------------
    def handle(self, payload: bytes) -> bytes:
        """One request message in, one reply message out."""
        try:
            msg = wire.decode(payload)
            if isinstance(msg, wire.VerifyRequest):
                return wire.encode_verify_result(self.verify(msg))
            if isinstance(msg, wire.Release):
                self.drop_session(msg.header.session_id)
                return b""
            if isinstance(msg, wire.Ping):
                return answer_ping(payload)
            raise wire.WireError(f"{msg.header.type.name} is not a request this tier answers")
        except wire.WireError as exc:
            header = wire.Header(wire.MsgType.ERROR, wire.peek_session_id(payload) or bytes(16), 0)
            return wire.encode_error(wire.ErrorMsg(header, 400, str(exc)))

    def _held(self, sid: bytes, base_len: int) -> _SessionState | None:
        """The session's state when this replica holds it at the device's committed length."""
        with self._lock:
            state = self._sessions.get(sid)
            if state is not None:
                self._sessions.move_to_end(sid)
        try:
            if state is None or self.engine.session_length(self._sid(sid)) != base_len:
                return None
        except SessionNotFound:
            return None
        return state

    def _sample(self, fed: int, elapsed_s: float, scores: ScoreOutput, image_prefill: bool) -> None:
        """Record a forward's service time: ``fed`` tokens in ``elapsed_s``; a forward shared with other sessions
        once, as the tokens all of them fed in its own time. An image prefill costs the vision encoder besides
        the forward: no sample of either."""
        if scores.shared_forward_tokens is not None:
            if scores.shared_forward_tokens:
                self.service_samples.append((scores.shared_forward_tokens, scores.compute_s))
        elif not image_prefill:
            self.service_samples.append((fed, elapsed_s))

    def verify(self, req: wire.VerifyRequest) -> wire.VerifyResult:
        sid = req.header.session_id
        header = wire.Header(wire.MsgType.VERIFY_RESULT, sid, req.header.seq)
        if req.context is not None:
            state: _SessionState | None = self._start(sid, req.context, req.sampling, req.logprobs, req.images)
        else:
            state = self._held(sid, req.base_len)
        if state is None:
            self.context_requests += 1
            return wire.VerifyResult(header, wire.VerifyStatus.NEED_CONTEXT)
        sampling, rng = state.sampling, state.rng
        self._check_ids(req.draft_ids, "draft")
        draft = req.draft_ids.tolist()
        started = time.perf_counter()
        try:
            scores = self.engine.score(self._sid(sid), draft, sampling, with_logprobs=state.logprobs is not None)
        except SessionNotFound:
            self.context_requests += 1
            return wire.VerifyResult(header, wire.VerifyStatus.NEED_CONTEXT)
        if sampling.greedy:
            assert scores.greedy_ids is not None
            accepted, next_token = verify_greedy(draft, scores.greedy_ids)
        else:
            assert scores.probs is not None
            if draft and (req.q_ids is None or req.q_probs is None):
                raise wire.WireError("a sampled draft must carry its draft distribution")
            q_ids = req.q_ids if req.q_ids is not None else np.zeros((0, 1), np.int32)
            q_probs = wire.normalize_q(req.q_probs) if req.q_probs is not None else np.zeros((0, 1))
            accepted, next_token = verify_sampled(draft, q_ids, q_probs, scores.probs, rng)
        emitted = [*draft[:accepted], next_token]
        try:
            self.engine.append(self._sid(sid), emitted)
            length = self.engine.session_length(self._sid(sid))
        except SessionNotFound:  # evicted by another session's start while this one was scored
            self.context_requests += 1
            return wire.VerifyResult(header, wire.VerifyStatus.NEED_CONTEXT)
        elapsed_s = time.perf_counter() - started
        self._sample(state.unfed + len(draft), elapsed_s, scores, state.with_images and state.unfed > 1)
        state.unfed = 1
        verify_us = int(elapsed_s * 1e6)
        return wire.VerifyResult(header, wire.VerifyStatus.OK, accepted, next_token, verify_us, length,
                                 _logprobs(scores.logprobs, emitted, state.logprobs))

    def generate_stream(self, payload: bytes) -> Iterator[bytes]:
        """Server-only: the prompt's ids arrive once; tokens stream back in TOKENS messages (``tokens_messages``).
        A GENERATE that continues a session this replica holds (``continue_from``) decodes on from it with the
        session's own sampling; a replica without it answers a 409 error, and the device sends the prompt
        instead."""
        msg = wire.decode(payload)
        if not isinstance(msg, wire.GenerateRequest):
            raise wire.WireError("expected a GENERATE message")
        sid = msg.header.session_id
        if msg.continue_from:
            held = self._held(sid, msg.continue_from)
            if held is None:
                self.context_requests += 1
                header = wire.Header(wire.MsgType.ERROR, sid, 0)
                yield wire.encode_error(wire.ErrorMsg(header, wire.CONTINUE_NOT_HELD, "this replica does not hold "
                                                      "the session at that length; send the prompt"))
                return
            state = held
        else:
            state = self._start(sid, msg.prompt_ids, msg.sampling, msg.logprobs, msg.images)
        native = getattr(self.engine, "stream_greedy", None)
        if native is not None and state.sampling.greedy and state.logprobs is None:
            # vLLM decodes the whole stream as one request, batched with every other stream and verify (a
            # continued session's tokens are its prompt: its prefix cache holds them).
            prompt = msg.prompt_ids.tolist() if not msg.continue_from else self.engine.session_tokens(self._sid(sid))
            self.drop_session(sid)
            yield from self._native_stream(native, sid, prompt, msg)
            return
        try:
            yield from tokens_messages(self._decoded(sid, state, msg), sid, self.stream_interval_s)
        finally:
            self.drop_session(sid)

    def _decoded(self, sid: bytes, state: _SessionState, msg: wire.GenerateRequest
                 ) -> Iterator[tuple[int, bool, wire.Logprobs | None]]:
        """(token, last, logprobs) of a server-only stream, one forward each, until the last."""
        sampling, rng = state.sampling, state.rng
        for i in range(msg.max_new_tokens):
            fed = state.unfed if i == 0 else 1
            started = time.perf_counter()
            scores = self.engine.score(self._sid(sid), [], sampling, with_logprobs=state.logprobs is not None)
            if sampling.greedy:
                assert scores.greedy_ids is not None
                token = scores.greedy_ids[0]
            else:
                assert scores.probs is not None
                _, token = verify_sampled([], np.zeros((0, 1), np.int32), np.zeros((0, 1)), scores.probs, rng)
            self.engine.append(self._sid(sid), [token])
            state.unfed = 1
            self._sample(fed, time.perf_counter() - started, scores, state.with_images and fed > 1)
            done = (token in self.engine.eos_token_ids and i + 1 >= msg.min_tokens) or i == msg.max_new_tokens - 1
            yield token, done, _logprobs(scores.logprobs, [token], state.logprobs)
            if done:
                break

    def _native_stream(self, native: Any, sid: bytes, prompt: list[int], msg: wire.GenerateRequest) -> Iterator[bytes]:
        tokens = native(prompt, msg.max_new_tokens)

        def decoded() -> Iterator[tuple[int, bool, wire.Logprobs | None]]:
            started = time.perf_counter()
            for i, token in enumerate(tokens):
                if i:  # the first token includes the prompt's prefill
                    self.service_samples.append((1, time.perf_counter() - started))
                started = time.perf_counter()
                done = (token in self.engine.eos_token_ids and i + 1 >= msg.min_tokens) or i == msg.max_new_tokens - 1
                yield token, done, None
                if done:
                    break

        try:
            yield from tokens_messages(decoded(), sid, self.stream_interval_s)
        finally:
            tokens.close()


def tokens_messages(decoded: Iterable[tuple[int, bool, wire.Logprobs | None]], sid: bytes, interval_s: float,
                    clock: Callable[[], float] = time.monotonic) -> Iterator[bytes]:
    """TOKENS messages of a server-only stream: the first token at once, later ones that come within
    ``interval_s`` of the last message held for the next (the device coalesces its client's chunks the same way,
    serve/stream_chunks.py). Each message costs CPU in the edge, the device, the ingress and the proxy; a token
    is held no longer than its stream's next forward. Tokens of one stream come no faster than its forwards, so
    with several streams sharing an engine, or forwards slower than the interval, every token goes at once."""
    held: list[int] = []
    parts: list[wire.Logprobs] = []
    last_sent_s: float | None = None
    index = -1
    done = False
    for index, (token, done, logprobs) in enumerate(decoded):
        held.append(token)
        if logprobs is not None:
            parts.append(logprobs)
        now_s = clock()
        if done or last_sent_s is None or now_s - last_sent_s >= interval_s:
            yield wire.encode_tokens(wire.Tokens(wire.Header(wire.MsgType.TOKENS, sid, index),
                                                 np.asarray(held, np.int32), done, wire.Logprobs.concat(parts)))
            held, parts, last_sent_s = [], [], now_s
    if held:  # the stream ended before its last token said so
        yield wire.encode_tokens(wire.Tokens(wire.Header(wire.MsgType.TOKENS, sid, index),
                                             np.asarray(held, np.int32), done, wire.Logprobs.concat(parts)))


def answer_ping(payload: bytes) -> bytes:
    """Reply to a link probe without touching a model, so the probe measures the link, not a queue."""
    try:
        msg = wire.decode(payload)
        if not isinstance(msg, wire.Ping):
            raise wire.WireError(f"{msg.header.type.name} is not a probe")
        return wire.encode_pong(wire.Pong(wire.Header(wire.MsgType.PONG, msg.header.session_id, msg.header.seq)))
    except wire.WireError as exc:
        header = wire.Header(wire.MsgType.ERROR, bytes(16), 0)
        return wire.encode_error(wire.ErrorMsg(header, 400, str(exc)))
