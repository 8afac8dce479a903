"""DeviceDrafter deployment: Serve glue around the device's logic in ``tiers/``.

What runs here: the transports over Serve handles (edge, cloud), the per-device links and their
prober (tiers/links.py), the start-up chores (tokenizer check against the edge, calibration), the
router reports, and the bridge from the synchronous path switch (tiers/paths.run_path, run in a
worker thread so the replica's event loop stays free) to Serve's async endpoints. A client
disconnect sets a flag the loop checks every round. Failures leave as ``Refusal`` values.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
from ray.exceptions import RayError

from aiflow_ray.config import AppArgs, GenerateOptions
from aiflow_ray.engines.base import Engine
from aiflow_ray.engines.compute_thread import shared_compute
from aiflow_ray.errors import CalibrationInterrupted, Refusal, RefusedError, TierUnavailable, give_way_if
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network import wire
from aiflow_ray.network.link import DuplexLink, RealClock
from aiflow_ray.routing.messages import GenerationReport
from aiflow_ray.serve.common import (
    CpuShare,
    LoadTracker,
    retime_due,
    router_handle,
    tier_engine,
)
from aiflow_ray.serve.stream_chunks import StreamChunks
from aiflow_ray.serve.transports import ServeCloud, ServeTransport
from aiflow_ray.tiers.device import DeviceDrafter, EdgeError, GenerationResult
from aiflow_ray.tiers.links import LinkProber, LinkRegistry, Sample
from aiflow_ray.tiers.paths import DeviceSide, PathUnavailable, TokenizerMismatch, check_tokenizers, run_path
from aiflow_ray.tiers.resilience import Resilience
from aiflow_ray.tiers.results import StreamDelta, StreamDone, TierResult, TokenLogprob, name_logprobs

log = get_logger(__name__)

CALL_TIMEOUT_S = 10.0  # start-up and probe calls; generation calls wait as long as the work takes
CALIBRATION_PREFILL_TOKENS = 128  # the longer calibration prompt, timed to its first token
LINK_WATCH_PERIOD_S = 0.5  # how soon a link change set through the admin API reaches requests in flight


class Cancelled(Exception):
    """The client went away; the generation stops at the next round."""


def _refusal_for(exc: Exception) -> Refusal:
    """The client's view of a failure inside the device tier: one sentence, no internals."""
    if isinstance(exc, RefusedError):
        return exc.refusal
    if isinstance(exc, PathUnavailable):
        return Refusal(400, str(exc), "path")
    if isinstance(exc, TokenizerMismatch):
        return Refusal(503, f"speculative paths are disabled: {exc}")
    if isinstance(exc, TierUnavailable):
        log.warning("generation failed: %s", exc)
        return Refusal(503, f"the {exc.tier} tier did not answer in time ({exc.reason}); retry shortly", None, 1)
    if isinstance(exc, EdgeError | RayError | TimeoutError):
        return Refusal(503, "the edge or cloud tier failed during this request; retry shortly", None, 1)
    log.exception("generation failed", exc_info=exc)
    return Refusal(503, "the device tier failed during this request; retry shortly", None, 1)


def generation_report(link_id: str, result: GenerationResult) -> GenerationReport:
    """What the router learns from one request: its link, acceptance and compute measurements, and the
    link's outages (transfers that missed their deadline)."""
    report = _generation_report(link_id, result)
    outages = tuple((int(n), float(s)) for n, s in result.trace.link_outages if n >= 1 and s > 0)
    return report.model_copy(update={"link_outages": outages, "link_id": link_id}) if outages else report


def _generation_report(link_id: str, result: GenerationResult) -> GenerationReport:
    trace, stats = result.trace, result.stats
    if trace.path == "device-edge" and trace.rounds and stats is not None:
        # Round 1 carries both prefills; steady-state costs come from the rest.
        return GenerationReport(
            link_id=link_id, path=trace.path, rounds=trace.rounds, drafted=stats.num_draft_tokens,
            accepted=stats.num_accepted_tokens, rejections=stats.num_rejections,
            draft_s=sum(trace.round_draft_s[1:]), draft_tokens=sum(trace.draft_lens[1:]),
            link_samples=tuple(zip(trace.round_bytes, trace.round_link_s, strict=True)))
    if trace.path == "on-device" and trace.num_tokens > 1:
        return GenerationReport(link_id=link_id, path=trace.path, rounds=trace.rounds,
                                on_device_s_per_token=trace.tpot_s)
    if trace.path == "device-edge-cloud" and "edge-cloud" in trace.links:
        cloud = trace.links["edge-cloud"]
        return GenerationReport(link_id=link_id, path=trace.path, rounds=trace.rounds,
                                cloud_link_samples=((int(cloud["bytes_up"] + cloud["bytes_down"]), cloud["time_s"]),))
    return GenerationReport(link_id=link_id, path=trace.path, rounds=trace.rounds)


class DeviceDrafterServer:
    def __init__(self, args: dict[str, Any], edge_handle: Any, cloud_handle: Any = None, engine: Engine | None = None,
                 router: Any = None) -> None:
        """``engine`` and ``router`` are injected by unit tests; Serve binds the edge and cloud handles."""
        self.args = AppArgs.model_validate(args)
        self.engine = tier_engine(self.args, "device", "drafter", engine)
        self._embedder: Any = None
        # llama.cpp's shared decodes (any thread may call the engine) interleave requests forward by forward: one
        # request's link round trip is another's drafting time. Other engines serve a request at a time.
        lock = None if getattr(self.engine, "shares_decodes", False) else threading.Lock()
        self.device = DeviceSide(DeviceDrafter(self.engine), lock, self._embed,
                                 max_context_tokens=self.args.context_limit_tokens(), image_limits=self.args.images)
        self.edge_handle = edge_handle
        self.cloud_handle = cloud_handle
        # The edge-cloud link is the edge's backhaul: one per replica, as configured (not per device).
        self.cloud_link = DuplexLink.from_config(self.args.edge_cloud_link, RealClock())
        self.links = LinkRegistry(self.args.router.max_draft_len)
        self._router = router
        # The device tier's load for the router's admission: every path's request runs here from start to end.
        self.load = LoadTracker("device", self.args, None, router)
        self._counts_lock = threading.Lock()
        self.active = 0  # generations running now
        self.cancelled = 0  # generations stopped because the client went away
        self.tokenizer_checked = False
        self.tokenizer_error: str | None = None
        # Calibrated after the edge answers (its model has loaded), not while every tier of a small node is
        # still loading: a drafter timed under that contention looked 8x slower than it is, and the router,
        # seeing no drafting afterwards, never learnt otherwise. Re-timed while idle for the same reason.
        self._calibration: GenerationReport | None = None
        self._calibrated_at: float | None = None
        self._drafted_at = 0.0
        self.cpu = CpuShare()
        self.contended_share = 0.0  # other processes' share of the CPUs during the last calibration
        self.prober = LinkProber(self.links, self.args.link_probe, self.args.link, self._probe_exchange,
                                 self._emulated_settings, self._report_probe, on_tick=self.startup_chores)
        self.prober.start()
        self._running_links: dict[str, int] = {}  # link id -> generations running on it
        self._stop_watching = threading.Event()
        threading.Thread(target=self._watch_links, name="aiflow-link-watch", daemon=True).start()

    def __del__(self) -> None:
        self.prober.stop()
        self._stop_watching.set()

    def _watch_links(self) -> None:
        """Apply emulated-link changes to generations in flight (an outage set mid-request reaches it)."""
        while not self._stop_watching.wait(LINK_WATCH_PERIOD_S):
            with self._counts_lock:
                running = [link_id for link_id, count in self._running_links.items() if count > 0]
            if not running:
                continue
            try:
                settings = self._router_handle().emulated_links_for.remote(running).result(timeout_s=CALL_TIMEOUT_S)
            except Exception as exc:  # the router may be restarting: keep the conditions as they are
                log.debug("could not refresh %d links: %s", len(running), type(exc).__name__)
                continue
            for link_id, (bandwidth_bps, rtt_s) in settings.items():
                self.links.get(link_id, self.args.link.model_copy(update={"bandwidth_bps": bandwidth_bps,
                                                                          "rtt_s": rtt_s}))

    # -- start-up -------------------------------------------------------------------------------
    def _router_handle(self) -> Any:
        self._router = self._router or router_handle(self.args)
        return self._router

    def _calibrate(self, stop: Callable[[], bool] | None = None) -> GenerationReport:
        """Time short local generations (the fastest of three), so the router knows the device's speed. ``stop``
        (a re-timing's) is asked before each: a request that arrived meanwhile waits for one generation, not the
        whole timing, which then records nothing (``CalibrationInterrupted``)."""
        from aiflow_ray.config import SamplingConfig

        ids = self.engine.encode_prompt("def add(a, b):", False)
        # A longer prompt's first token: the prefill the router adds to TTFT grows with the prompt.
        long_ids = (ids * (CALIBRATION_PREFILL_TOKENS // max(len(ids), 1) + 1))[:CALIBRATION_PREFILL_TOKENS]
        with self.device.locked():
            give_way_if(stop)
            self.device.drafter.generate_local(ids, 2, SamplingConfig())  # warm-up
            self.cpu.others_share()
            traces = []
            own = shared_compute().exclusive  # this drafter's time, not other tiers' turns (tiers/edge.py)
            for _ in range(3):
                give_way_if(stop)
                with own():
                    traces.append(self.device.drafter.generate_local(ids, 9, SamplingConfig()).trace)
            give_way_if(stop)
            with own():
                long_ttft_s = self.device.drafter.generate_local(long_ids, 1, SamplingConfig()).trace.ttft_s
            self.contended_share = self.cpu.others_share()
        self._calibrated_at = time.monotonic()
        s_per_token = min(t.tpot_s for t in traces)
        prefills = ((len(ids), min(t.ttft_s for t in traces)), (len(long_ids), long_ttft_s))
        log.info("device calibrated: %.1f ms per token; first token after %s (other processes kept %.0f%% of "
                 "the node's CPUs busy meanwhile)", s_per_token * 1e3,
                 ", ".join(f"{n} prompt tokens {s * 1e3:.1f} ms" for n, s in prefills), 100 * self.contended_share)
        return GenerationReport(link_id="", path="calibration", on_device_s_per_token=s_per_token,
                                prefill_samples=prefills)

    def _calibration_due(self) -> bool:
        """Never timed, or re-timing due (``retime_due``); called on each of the prober's ticks, so the others'
        share is the one since the last tick."""
        if self._calibrated_at is None:
            return True
        others_now = self.cpu.others_share()
        now = time.monotonic()
        idle_s = 0.0 if self.active else now - max(self._calibrated_at, self._drafted_at)
        return retime_due(idle_s, now - self._calibrated_at, self.contended_share, others_now)

    def startup_chores(self) -> None:
        """Check the edge's tokenizer, then report the calibration (which makes /readyz count the device)."""
        try:
            if not self.tokenizer_checked:
                theirs = self.edge_handle.vocab_fingerprint.remote().result(timeout_s=CALL_TIMEOUT_S)
                vision = self.edge_handle.vision.remote().result(timeout_s=CALL_TIMEOUT_S)
                self.tokenizer_checked = True
                try:
                    check_tokenizers(self.engine.vocab_fingerprint(), theirs, "the device's drafter",
                                     "the edge's verifier")
                    mine = self.engine.vision.fingerprint() if self.engine.vision is not None else None
                    if mine != vision["spec"]:
                        raise TokenizerMismatch("the device's drafter and the edge's verifier turn images into "
                                                "different tokens")
                    self.device.verifier_encoder_digest = vision["encoder_digest"]
                except TokenizerMismatch as exc:
                    self.tokenizer_error = str(exc)
                    log.error("%s: refusing speculative and edge paths", exc)
            if self.tokenizer_checked and self.tokenizer_error is None and self._calibration_due():
                # The first timing runs whole; a re-timing gives way to requests.
                retiming = self._calibrated_at is not None
                try:
                    self._calibration = self._calibrate(stop=(lambda: self.active > 0) if retiming else None)
                except CalibrationInterrupted:
                    log.info("device re-timing gave way to a request")
            if self._calibration is not None and self.tokenizer_error is None:
                self._router_handle().report_generation.remote(self._calibration).result(timeout_s=CALL_TIMEOUT_S)
                self._calibration = None
        except Exception as exc:  # the edge or the router may still be starting
            log.debug("start-up chore not done yet: %s", exc)

    # -- links ----------------------------------------------------------------------------------
    def _probe_exchange(self, link: DuplexLink, payload: bytes) -> bytes:
        # Bounded like any call: a probe over a link in outage must not stall the prober's thread.
        link.up.transfer(len(payload), timeout_s=CALL_TIMEOUT_S)
        reply: bytes = self.edge_handle.ping.remote(payload).result(timeout_s=CALL_TIMEOUT_S)
        link.down.transfer(len(reply), timeout_s=CALL_TIMEOUT_S)
        return reply

    def _edge_alive(self) -> bool:
        """The router's view: some edge replica on a live node reported lately. Unknown counts as alive."""
        try:
            return bool(self._router_handle().tier_available.remote("edge").result(timeout_s=CALL_TIMEOUT_S / 5))
        except Exception as exc:
            log.debug("could not ask the router about the edge: %s", type(exc).__name__)
            return True

    def _emulated_settings(self, link_id: str) -> tuple[float, float] | None:
        cfg = self._router_handle().emulated_link.remote(link_id).result(timeout_s=CALL_TIMEOUT_S)
        return None if cfg is None else (cfg.bandwidth_bps, cfg.rtt_s)

    def _report_probe(self, link_id: str, small: Sample, big: Sample) -> None:
        self._router_handle().report_generation.remote(
            GenerationReport(link_id=link_id, path="probe", probe_pairs=((small, big),)))

    def _embed(self, text: str) -> np.ndarray:
        if self._embedder is None:  # loaded on first use: most devices never send embeddings
            from aiflow_ray.rag.embedder import Embedder

            self._embedder = Embedder()
        vector: np.ndarray = self._embedder.embed([text])[0]
        return vector

    # -- generation -----------------------------------------------------------------------------
    def _run(self, opts: GenerateOptions, cancel: threading.Event, on_tokens: Any = None) -> GenerationResult:
        if self.tokenizer_error is not None and opts.path != "on-device":
            raise TokenizerMismatch(self.tokenizer_error)
        state = self.links.get(opts.link_id, opts.link)
        state.last_request_at = time.monotonic()

        def on_round(emitted: list[int], logprobs: wire.Logprobs | None) -> None:
            if cancel.is_set():
                raise Cancelled()
            if on_tokens is not None and emitted:
                on_tokens(emitted, logprobs)

        deadlines = self.args.deadlines
        deadline = time.monotonic() + min(opts.deadline_s or deadlines.request_s, deadlines.request_s)
        resilience = Resilience(deadline, deadlines.max_failovers, fallback=opts.device_fallback,
                                link_timeout_s=deadlines.link_outage_s if opts.device_fallback else None,
                                edge_alive=self._edge_alive)
        cloud = None if self.cloud_handle is None else ServeCloud(self.cloud_handle, deadlines.cloud_call_s, deadline,
                                                                   deadlines.max_failovers + 1)
        with self._count_active(opts.link_id):
            result = run_path(opts, self.device, ServeTransport(self.edge_handle, state.link, deadlines.edge_call_s),
                              policy=state.policy, cloud=cloud, cloud_link=self.cloud_link, on_round=on_round,
                              resilience=resilience)
        if opts.path == "device-edge":  # its rounds are link measurements; a server-only stream is not
            state.last_traffic_at = time.monotonic()
        if opts.path in ("device-edge", "on-device"):  # the router measured the drafter from this request
            self._drafted_at = time.monotonic()
        try:
            self._router_handle().report_generation.remote(generation_report(opts.link_id, result))  # fire and forget
        except Exception as exc:
            log.warning("could not report to the router: %s", exc)
        return result

    def _token_text(self, token_id: int) -> str:
        return self.engine.decode([token_id])

    def _result(self, result: GenerationResult) -> TierResult:
        named = name_logprobs(self._token_text, result.token_ids, result.logprobs) if result.logprobs else None
        return TierResult(result.text, result.token_ids, result.prompt_tokens, result.trace, named)

    async def generate(self, opts: GenerateOptions) -> TierResult | Refusal:
        self.load.start()
        cancel = threading.Event()
        try:
            result = await asyncio.to_thread(self._run, opts, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the worker thread stops at its next round
            raise
        except Exception as exc:
            return _refusal_for(exc)
        return self._result(result)

    async def generate_stream(self, opts: GenerateOptions) -> AsyncIterator[StreamDelta | StreamDone | Refusal]:
        """``StreamDelta``s (as ``StreamChunks`` groups the rounds), then ``StreamDone``; a failure ends the
        stream with a ``Refusal``."""
        self.load.start()
        cancel = threading.Event()
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        chunks = StreamChunks(self.engine.decode, self.args.stream_interval_s)

        def work() -> None:
            try:
                events.put(("done", self._run(opts, cancel, lambda t, lp: events.put(("tokens", (t, lp))))))
            except Exception as exc:
                events.put(("error", exc))

        threading.Thread(target=work, name="aiflow-generate", daemon=True).start()
        try:
            while True:
                try:
                    kind, value = await asyncio.to_thread(events.get, True, chunks.wait_s())
                except queue.Empty:  # the held chunk has waited the whole interval
                    kind, value = "flush", None
                if kind == "tokens" and not chunks.add(*value):
                    continue
                if kind in ("tokens", "flush"):
                    tokens, text, logprobs = chunks.take()
                    yield StreamDelta(tokens, text, self._named(tokens, logprobs))
                elif kind == "done":
                    result: GenerationResult = value
                    yield StreamDone(result.text[len(chunks.sent_text):], len(result.token_ids), result.prompt_tokens,
                                     result.trace, self._named(chunks.tokens, chunks.logprobs),
                                     result.token_ids[chunks.sent_tokens:])
                    return
                else:
                    if not isinstance(value, Cancelled):
                        yield _refusal_for(value)
                    return
        finally:
            cancel.set()

    def _named(self, tokens: list[int], parts: list[wire.Logprobs]) -> list[TokenLogprob] | None:
        lp = wire.Logprobs.concat(parts)
        return None if lp is None else name_logprobs(self._token_text, tokens, lp)

    @contextlib.contextmanager
    def _count_active(self, link_id: str) -> Iterator[None]:
        with self._counts_lock:
            self.active += 1
            self._running_links[link_id] = self._running_links.get(link_id, 0) + 1
        try:
            with self.load.admitted(), self.load.busy():
                yield
        except Cancelled:
            with self._counts_lock:
                self.cancelled += 1
            log.info("generation cancelled: the client went away")
            raise
        finally:
            with self._counts_lock:
                self.active -= 1
                self._running_links[link_id] -= 1
                if not self._running_links[link_id]:
                    del self._running_links[link_id]

    async def stats(self) -> dict[str, Any]:
        return {"active": self.active, "cancelled": self.cancelled, "links": len(self.links),
                "tokenizer_checked": self.tokenizer_checked, "tokenizer_error": self.tokenizer_error}

    async def check_health(self) -> None:
        return None
