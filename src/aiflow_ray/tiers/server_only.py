"""Server-only, the paper's baseline: the prompt's ids (and images) cross once, the large model decodes alone
and streams tokens down; a failed edge is resumed on another replica, or the device finishes the output."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from aiflow_ray.config import SamplingConfig
from aiflow_ray.errors import TierUnavailable
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network import wire
from aiflow_ray.network.link import LinkTimeout
from aiflow_ray.tiers.device import Continuation, EdgeError, GenerationResult, OnRound, Transport
from aiflow_ray.tiers.images import PreparedImage, trace_images
from aiflow_ray.tiers.resilience import Resilience
from aiflow_ray.tiers.trace import Trace

log = get_logger(__name__)


class _NotHeld(Exception):
    """The replica asked to continue a session no longer holds it."""


def generate_server_only(
    prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig, transport: Transport,
    decode: Callable[[list[int]], str], on_token: OnRound | None = None, min_tokens: int = 0,
    logprobs: int | None = None, resilience: Resilience | None = None,
    finish_on_device: Callable[[list[int], int], list[int]] | None = None,
    images: Sequence[PreparedImage] = (), continuation: Continuation | None = None,
) -> GenerationResult:
    """Baseline: the prompt's ids cross once; the large model decodes alone and streams tokens down.

    When the edge fails mid-stream (with ``resilience``), the request resumes on another replica from the
    tokens already received: the prompt and those tokens go up as the new prompt, so greedy output is
    unchanged and sampled output still follows the large model's distribution. When the small model's
    output is acceptable (``resilience.fallback``) and the edge fails again after a retry, or the link
    stalls, ``finish_on_device(tokens so far, tokens left)`` completes the output on the device.

    With ``continuation`` a speculative request goes on here: the first GENERATE names its session and
    carries no prompt, so only a header crosses; a replica that no longer holds the session (or a failure)
    sends the prompt and the tokens so far instead, as a resume does. Its tokens and times go into the
    continuation's output and trace, which the caller finishes.
    """
    clock = transport.clock
    if continuation is None:
        trace = Trace(path="server-only")
        trace_images(trace, images)
        logprob_parts: list[wire.Logprobs] = []
        started = clock.now()
        out: list[int] = []
    else:
        trace, logprob_parts, started, out = (continuation.trace, continuation.logprob_parts, continuation.started,
                                              continuation.out)
    payloads = tuple(image.payload for image in images)
    last_arrival = started
    failovers = 0
    finished = False
    continuing = continuation is not None
    while not finished:
        if continuing:
            assert continuation is not None
            req = wire.GenerateRequest(
                wire.Header(wire.MsgType.GENERATE, continuation.session, 0), np.zeros(0, np.int32),
                max_new_tokens - len(out), None, max(min_tokens - len(out), 0), continue_from=continuation.committed)
        else:
            req = wire.GenerateRequest(
                wire.Header(wire.MsgType.GENERATE, wire.new_session_id(), 0),
                np.asarray([*prompt_ids, *out], np.int32), max_new_tokens - len(out),
                None if sampling.greedy else sampling, max(min_tokens - len(out), 0), logprobs, payloads,
            )
            trace.image_bytes_sent += sum(len(p.data) for p in payloads)
        payload = wire.encode_generate(req)
        trace.bytes_up += len(payload)
        try:
            for message, arrival in transport.stream(payload, session_bound=continuing):
                trace.bytes_down += len(message)
                tokens = wire.decode(message)
                if isinstance(tokens, wire.ErrorMsg):
                    if continuing and tokens.code == wire.CONTINUE_NOT_HELD:
                        raise _NotHeld()
                    raise EdgeError(f"edge error {tokens.code}: {tokens.message}")
                assert isinstance(tokens, wire.Tokens)
                ids = tokens.token_ids.tolist()
                out.extend(ids)
                if tokens.logprobs is not None:
                    logprob_parts.append(tokens.logprobs)
                trace.token_times_s.extend([arrival - started] * len(ids))
                last_arrival = arrival
                finished = tokens.done
                if on_token is not None:
                    on_token(ids, tokens.logprobs)
                if resilience is not None and not finished:
                    resilience.check()
            finished = True
        except _NotHeld:
            log.info("the edge no longer holds the session; the prompt goes up with %d tokens", len(out))
            continuing = False
            trace.context_resends += 1
            continue
        except (TierUnavailable, LinkTimeout) as exc:
            if resilience is None:
                raise
            continuing = False  # a retry may reach any replica: the prompt goes with it
            failure = exc if isinstance(exc, TierUnavailable) else TierUnavailable("edge", "link outage")
            failovers += 1
            if (resilience.fallback and finish_on_device is not None and logprobs is None
                    and (isinstance(exc, LinkTimeout) or failovers > 1)):
                log.warning("server-only stream: the edge is lost (%s); the device finishes the output",
                            failure.reason)
                trace.fallback, trace.fallback_at = failure.reason, len(out)
                for token in finish_on_device(list(out), max_new_tokens - len(out)):
                    out.append(token)
                    trace.token_times_s.append(clock.now() - started)
                last_arrival = clock.now()
                break
            trace.failovers += 1
            resilience.wait_before_retry(failovers, failure)
        finished = finished or len(out) >= max_new_tokens
    clock.sleep_until(last_arrival)
    if continuation is not None:
        return GenerationResult(out, "", trace)  # the speculative caller finishes the trace and the result
    trace.rounds = len(out)
    trace.finish()
    return GenerationResult(out, decode(out), trace, prompt_tokens=len(prompt_ids),
                            logprobs=wire.Logprobs.concat(logprob_parts))
