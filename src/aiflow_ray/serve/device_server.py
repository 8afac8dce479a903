"""DeviceDrafter deployment: the small model, the speculative loop, the emulated device links.

The loop is synchronous (each step waits for a forward pass) and runs in a worker thread, so the
replica's event loop stays free; the thread talks to the edge through blocking handle calls, which
Serve allows outside the event loop. A client disconnect sets a flag the loop checks every round.

A replica stands in for every device whose requests reach it, so it keeps one emulated link and one
draft-length policy per link id (per device). A background thread probes each recently used link
that has been quiet for ``link_probe.interval_s``: without probes, a router that moved a device's
requests on-device because its link was slow would never see the link recover.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiflow_ray.config import DraftPolicyConfig, GenerateOptions, GroundingOptions, SamplingConfig
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network.link import DuplexLink, RealClock
from aiflow_ray.network.probe import probe_link
from aiflow_ray.rag.prompting import grounded_messages
from aiflow_ray.routing.router import GenerationReport
from aiflow_ray.serve.args import AppArgs
from aiflow_ray.serve.common import configure_torch_threads, router_handle
from aiflow_ray.speculative.policy import AdaptiveDraftLen, FixedDraftLen
from aiflow_ray.tiers.device import DeviceDrafter, GenerationResult, generate_server_only
from aiflow_ray.tiers.trace import Trace

log = get_logger(__name__)


MAX_LINKS_PER_REPLICA = 256


class Cancelled(Exception):
    """The client went away; the generation stops at the next round."""


@dataclass
class DeviceLinkState:
    """One device's emulated link, its draft-length policy, and when the link last carried traffic."""

    link: DuplexLink
    policy: AdaptiveDraftLen
    settings: tuple[float, float]
    last_traffic_at: float = field(default_factory=time.monotonic)  # last link measurement
    last_request_at: float = field(default_factory=time.monotonic)


class ServeTransport:
    """Device <-> edge over Serve handles, every payload passing the emulated link."""

    def __init__(self, edge_handle: Any, link: DuplexLink) -> None:
        self.edge = edge_handle
        self.link = link
        self.clock = link.clock

    def _for(self, payload: bytes) -> Any:
        return self.edge.options(multiplexed_model_id=payload[4:20].hex())

    def exchange(self, payload: bytes) -> bytes:
        self.link.up.transfer(len(payload))
        reply: bytes = self._for(payload).verify.remote(payload).result()
        self.link.down.transfer(len(reply))
        return reply

    def notify(self, payload: bytes) -> None:
        self.link.up.schedule(len(payload))
        self._for(payload).release.remote(payload)

    def probe(self, payload: bytes) -> bytes:
        self.link.up.transfer(len(payload))
        reply: bytes = self.edge.ping.remote(payload).result()
        self.link.down.transfer(len(reply))
        return reply

    def stream(self, payload: bytes) -> Iterator[tuple[bytes, float]]:
        self.link.up.transfer(len(payload))
        responses = self._for(payload).options(stream=True).generate_stream.remote(payload)
        try:
            for message in responses:
                arrival = self.link.down.schedule(len(message))
                self.clock.sleep_until(arrival)
                yield message, arrival
        finally:
            responses.cancel()  # a no-op when the stream completed; stops the edge when we gave up


class DeviceDrafterServer:
    def __init__(self, args: dict[str, Any], edge_handle: Any, cloud_handle: Any = None, engine: Any = None) -> None:
        self.args = AppArgs.model_validate(args)
        configure_torch_threads(self.args.device.torch_threads)
        if engine is None:
            from aiflow_ray.models.loader import load_engine

            pair = self.args.model_pair()
            engine = load_engine(pair.drafter, pair.dtype, pair.device)
        self.engine = engine
        self.device = DeviceDrafter(engine)
        self.edge_handle = edge_handle
        self.cloud_handle = cloud_handle
        # The edge-cloud link is the edge's backhaul: one per replica, as configured (not per device).
        self.cloud_link = DuplexLink.from_config(self.args.edge_cloud_link, RealClock())
        self._embedder: Any = None
        self._engine_lock = threading.Lock()
        self._links: OrderedDict[str, DeviceLinkState] = OrderedDict()
        self._links_lock = threading.Lock()
        self._router: Any = None
        self._counts_lock = threading.Lock()
        self.active = 0  # generations running now
        self.cancelled = 0  # generations stopped because the client went away
        self._stop = threading.Event()
        self._calibration = self._calibrate()
        threading.Thread(target=self._background, name="aiflow-device-background", daemon=True).start()

    def __del__(self) -> None:
        self._stop.set()

    # -- helpers --------------------------------------------------------------------------------
    def _link_state(self, link_id: str, bandwidth_bps: float | None = None, rtt_s: float | None = None
                    ) -> DeviceLinkState:
        """The device's link, created on first use and set to the emulated conditions given."""
        with self._links_lock:
            state = self._links.get(link_id)
            if state is None:
                # Device-level knowledge carried across requests: acceptance, compute and link estimates.
                policy = AdaptiveDraftLen(DraftPolicyConfig(policy="adaptive",
                                                            max_draft_len=self.args.router.max_draft_len))
                link = DuplexLink.from_config(self.args.link, RealClock())
                state = DeviceLinkState(link, policy, (self.args.link.bandwidth_bps, self.args.link.rtt_s))
                self._links[link_id] = state
                while len(self._links) > MAX_LINKS_PER_REPLICA:
                    self._links.popitem(last=False)
            self._links.move_to_end(link_id)
        if bandwidth_bps is not None and rtt_s is not None and (bandwidth_bps, rtt_s) != state.settings:
            state.link.set_conditions(bandwidth_bps, rtt_s)
            state.settings = (bandwidth_bps, rtt_s)
        return state

    def _router_handle(self) -> Any:
        self._router = self._router or router_handle(self.args)
        return self._router

    def _calibrate(self) -> GenerationReport:
        """Time a short local generation, so the router knows the device's speed before traffic."""
        ids = self.engine.encode_prompt("def add(a, b):", False)
        self.device.generate_local(ids, 2, SamplingConfig())  # warm-up
        trace = self.device.generate_local(ids, 9, SamplingConfig()).trace
        log.info("device calibrated: %.1f ms per token", trace.tpot_s * 1e3)
        return GenerationReport(link_id="", path="calibration", on_device_s_per_token=trace.tpot_s)

    def _background(self) -> None:
        """Deliver the calibration, then probe quiet links for as long as the replica lives."""
        cfg = self.args.link_probe
        calibration: GenerationReport | None = self._calibration
        seq = 0
        while not self._stop.wait(cfg.interval_s / 2):
            if calibration is not None:
                try:
                    self._router_handle().report_generation.remote(calibration).result(timeout_s=10)
                    calibration = None
                except Exception as exc:  # the router may still be starting
                    log.debug("calibration report failed: %s", exc)
            if not cfg.enabled:
                continue
            now = time.monotonic()
            with self._links_lock:
                due = [(lid, st) for lid, st in self._links.items()
                       if now - st.last_traffic_at >= cfg.interval_s and now - st.last_request_at <= cfg.idle_stop_s]
            for link_id, state in due:
                try:
                    # The emulated conditions live with the router (the admin API sets them there);
                    # asking costs one call per probe, not per request.
                    settings = self._router_handle().emulated_link.remote(link_id).result(timeout_s=10)
                    if settings is not None:
                        self._link_state(link_id, settings["bandwidth_bps"], settings["rtt_s"])
                    transport = ServeTransport(self.edge_handle, state.link)
                    samples = probe_link(transport.probe, state.link.clock, cfg.padding_bytes, seq)
                    seq += 2
                except Exception as exc:  # edge restarting, router not up yet: try again next period
                    log.debug("link probe on %s failed: %s", link_id, exc)
                    continue
                state.last_traffic_at = time.monotonic()
                small, big = samples
                state.policy.link.observe_pair(small, big)
                try:
                    self._router_handle().report_generation.remote(
                        GenerationReport(link_id=link_id, path="probe", probe_pairs=[(small, big)]))
                except Exception as exc:
                    log.debug("could not report a probe: %s", exc)

    def _report(self, link_id: str, result: GenerationResult) -> None:
        trace = result.trace
        report = GenerationReport(link_id=link_id, path=trace.path, rounds=trace.rounds)
        if trace.path == "device-edge" and trace.rounds:
            report.drafted = sum(trace.draft_lens)
            report.accepted = sum(trace.accepted)
            report.rejections = sum(1 for d, a in zip(trace.draft_lens, trace.accepted, strict=True) if a < d)
            # Round 1 carries both prefills; steady-state costs come from the rest.
            report.draft_s = sum(trace.round_draft_s[1:])
            report.draft_tokens = sum(trace.draft_lens[1:])
            report.link_samples = [(b, s) for b, s in zip(trace.round_bytes, trace.round_link_s, strict=True)]
        elif trace.path == "on-device" and trace.num_tokens > 1:
            report.on_device_s_per_token = trace.tpot_s
        elif trace.path == "device-edge-cloud" and "edge-cloud" in trace.links:
            cloud = trace.links["edge-cloud"]
            report.cloud_link_samples = [(int(cloud["bytes_up"] + cloud["bytes_down"]), cloud["time_s"])]
        try:
            self._router_handle().report_generation.remote(report)  # fire and forget: off the hot path
        except Exception as exc:
            log.warning("could not report to the router: %s", exc)

    def _run(self, request: dict[str, Any], cancel: threading.Event,
             on_tokens: Any = None) -> GenerationResult:
        opts = GenerateOptions.model_validate(request["options"])
        link_id = request.get("link_id", "device-0")
        state = self._link_state(link_id, request.get("link_bandwidth_bps"), request.get("link_rtt_s"))
        state.last_request_at = time.monotonic()

        def on_round(_round: int, emitted: list[int]) -> None:
            if cancel.is_set():
                raise Cancelled()
            if on_tokens is not None:
                on_tokens(emitted)

        with self._count_active():
            if opts.path == "device-edge-cloud":
                result = self._grounded(opts, state, cancel, on_round)
            elif opts.path == "server-only":
                # The device's model is not involved, so server-only requests do not queue behind it.
                transport = ServeTransport(self.edge_handle, state.link)
                result = generate_server_only(opts.prompt_input(), opts.chat, opts.max_new_tokens, opts.sampling,
                                              transport, self.engine.decode, on_token=on_round)
            else:
                with self._engine_lock:
                    if cancel.is_set():
                        raise Cancelled()
                    ids = self.engine.encode_prompt(opts.prompt_input(), opts.chat)
                    if opts.path == "on-device":
                        result = self.device.generate_local(ids, opts.max_new_tokens, opts.sampling,
                                                            on_token=on_round)
                    else:
                        result = self._speculate(ids, opts, state, on_round)
        if opts.path == "device-edge":  # its rounds are link measurements; a server-only stream is not
            state.last_traffic_at = time.monotonic()
        self._report(link_id, result)
        return result

    def _speculate(self, ids: list[int], opts: GenerateOptions, state: DeviceLinkState,
                   on_round: Any) -> GenerationResult:
        """The speculative loop over this device's link (the caller holds the engine lock)."""
        policy: Any = state.policy if opts.draft_len == "auto" else FixedDraftLen(opts.draft_policy())
        transport = ServeTransport(self.edge_handle, state.link)
        return self.device.generate_speculative(ids, opts.max_new_tokens, opts.sampling, policy, transport,
                                                on_round=on_round)

    def _grounded(self, opts: GenerateOptions, state: DeviceLinkState, cancel: threading.Event,
                  on_round: Any) -> GenerationResult:
        """device-edge-cloud: the query goes up through the edge to the cloud; either the cloud answers
        with beam search over the retrieved chunks, or the chunks come back and the device and edge
        decode over them speculatively. Only the query (text or a 768-byte embedding) goes up."""
        if self.cloud_handle is None:
            raise RuntimeError("this device tier has no cloud handle")
        grounding = opts.grounding or GroundingOptions()
        clock = state.link.clock
        links = {name: {"bytes_up": 0, "bytes_down": 0, "time_s": 0.0} for name in ("device-edge", "edge-cloud")}
        stages: dict[str, float] = {}

        def hop(direction: str, nbytes: int) -> None:
            # Device -> edge -> cloud going up, the reverse coming down; the edge relays.
            order = [("device-edge", state.link), ("edge-cloud", self.cloud_link)]
            for name, link in order if direction == "up" else reversed(order):
                links[name][f"bytes_{direction}"] += nbytes
                links[name]["time_s"] += (link.up if direction == "up" else link.down).transfer(nbytes)

        question = opts.prompt
        if opts.messages:
            question = next((t.content for t in reversed(opts.messages) if t.role == "user"), opts.prompt)
        started = clock.now()
        request: dict[str, Any] = {"top_k": grounding.top_k}
        if grounding.query_encoding == "embedding":
            t0 = time.perf_counter()
            if self._embedder is None:
                from aiflow_ray.rag.embedder import Embedder

                self._embedder = Embedder()
            vector = self._embedder.embed([question])[0].astype("<f2")
            stages["device_embed_s"] = time.perf_counter() - t0
            request["query_vector_f16"] = base64.b64encode(vector.tobytes()).decode()
            query_bytes = vector.nbytes  # binary on a real wire; base64 only inside this emulation
        else:
            request["query"] = question
            query_bytes = len(question.encode())
        if cancel.is_set():
            raise Cancelled()
        hop("up", query_bytes + 8)
        if grounding.generation == "beam":
            out = self.cloud_handle.generate.remote({
                **request, "question": question, "beam_width": grounding.beam_width,
                "length_penalty": grounding.length_penalty, "max_new_tokens": opts.max_new_tokens,
            }).result()
            retrieval = out["retrieval"]
            token_ids = out["token_ids"]
            hop("down", 4 * len(token_ids) + sum(len(h["chunk_id"]) for h in retrieval["hits"]) + 8)
            stages.update(cloud_generate_s=out["compute_s"])
            trace = Trace(path="device-edge-cloud")
            arrival = clock.now() - started
            trace.token_times_s = [arrival] * len(token_ids)  # beam search answers all at once
            trace.finish(started)
            if on_round is not None and token_ids:
                on_round(1, token_ids)
            result = GenerationResult(token_ids, out["text"], trace)
            result.trace.retrieval = {"sum_logprob": out["sum_logprob"], "beam_width": grounding.beam_width}
        else:
            retrieval = self.cloud_handle.retrieve.remote(request).result()
            messages, used = grounded_messages(question, retrieval["hits"])
            retrieval["hits"] = retrieval["hits"][:used]
            hop("down", sum(len(h["text"].encode()) + len(h["chunk_id"]) for h in retrieval["hits"]) + 8)
            ids = self.engine.encode_prompt(messages, True)
            decode_started = clock.now()
            with self._engine_lock:
                result = self._speculate(ids, opts, state, on_round)
            # The decode's clock starts after retrieval; the client's starts at the request.
            offset = decode_started - started
            result.trace.token_times_s = [t + offset for t in result.trace.token_times_s]
            result.trace.finish(started)
            result.trace.path = "device-edge-cloud"
            links["device-edge"]["bytes_up"] += result.trace.bytes_up
            links["device-edge"]["bytes_down"] += result.trace.bytes_down
            links["device-edge"]["time_s"] += result.trace.link_s
            stages["speculative_decode_s"] = clock.now() - decode_started
        stages.update(cloud_embed_s=retrieval["embed_s"], search_s=retrieval["search_s"])
        trace = result.trace
        trace.links, trace.stages = links, stages
        trace.bytes_up = int(links["device-edge"]["bytes_up"])
        trace.bytes_down = int(links["device-edge"]["bytes_down"])
        trace.retrieval.update(
            query_encoding=grounding.query_encoding, generation=grounding.generation,
            num_chunks=retrieval["num_chunks"],
            hits=[{k: h[k] for k in ("chunk_id", "source", "score")} for h in retrieval["hits"]],
        )
        return result

    # -- endpoints ------------------------------------------------------------------------------
    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        cancel = threading.Event()
        try:
            result = await asyncio.to_thread(self._run, request, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the worker thread stops at its next round
            raise
        return {"text": result.text, "token_ids": result.token_ids, "trace": result.trace.to_dict()}

    async def generate_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Yield ``{"token_ids": [...], "text": delta}`` per round, then ``{"done": ..., "trace": ...}``."""
        cancel = threading.Event()
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        emitted: list[int] = []
        sent_text = ""

        def on_tokens(tokens: list[int]) -> None:
            events.put(("tokens", list(tokens)))

        def work() -> None:
            try:
                result = self._run(request, cancel, on_tokens)
                events.put(("done", result))
            except Exception as exc:
                events.put(("error", exc))

        thread = threading.Thread(target=work, name="aiflow-generate", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = await asyncio.to_thread(events.get)
                if kind == "tokens":
                    emitted.extend(value)
                    text = self.engine.decode(emitted)
                    # Hold back a trailing partial UTF-8 character until it completes.
                    if text.endswith("\ufffd"):
                        continue
                    delta, sent_text = text[len(sent_text):], text
                    yield {"token_ids": value, "text": delta}
                elif kind == "done":
                    result = value
                    tail = result.text[len(sent_text):]
                    yield {"done": True, "text": tail, "trace": result.trace.to_dict(),
                           "num_tokens": len(result.token_ids)}
                    return
                else:
                    raise value
        finally:
            cancel.set()

    @contextlib.contextmanager
    def _count_active(self) -> Iterator[None]:
        with self._counts_lock:
            self.active += 1
        try:
            yield
        except Cancelled:
            with self._counts_lock:
                self.cancelled += 1
            log.info("generation cancelled: the client went away")
            raise
        finally:
            with self._counts_lock:
                self.active -= 1

    async def stats(self) -> dict[str, Any]:
        return {"active": self.active, "cancelled": self.cancelled, "links": len(self._links)}

    async def check_health(self) -> None:
        return None
