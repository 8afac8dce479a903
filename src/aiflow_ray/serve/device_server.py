"""DeviceDrafter deployment: the small model, the speculative loop, the emulated device link.

The loop is synchronous (each step waits for a forward pass) and runs in a worker thread, so the
replica's event loop stays free; the thread talks to the edge through blocking handle calls, which
Serve allows outside the event loop. A client disconnect sets a flag the loop checks every round.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiflow_ray.config import DraftPolicyConfig, GenerateOptions
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.network.link import DuplexLink, RealClock
from aiflow_ray.routing.router import GenerationReport
from aiflow_ray.serve.args import AppArgs
from aiflow_ray.serve.common import router_handle
from aiflow_ray.speculative.policy import AdaptiveDraftLen, FixedDraftLen
from aiflow_ray.tiers.device import DeviceDrafter, GenerationResult, generate_server_only

log = get_logger(__name__)


class Cancelled(Exception):
    """The client went away; the generation stops at the next round."""


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
    def __init__(self, args: dict[str, Any], edge_handle: Any, engine: Any = None) -> None:
        self.args = AppArgs.model_validate(args)
        if engine is None:
            from aiflow_ray.models.loader import load_engine

            pair = self.args.model_pair()
            engine = load_engine(pair.drafter, pair.dtype, pair.device)
        self.engine = engine
        self.device = DeviceDrafter(engine)
        self.edge_handle = edge_handle
        self.link = DuplexLink.from_config(self.args.link, RealClock())
        self._link_settings = (self.args.link.bandwidth_bps, self.args.link.rtt_s)
        self._engine_lock = threading.Lock()
        # Device-level knowledge carried across requests: acceptance, compute and link estimates.
        self.policy = AdaptiveDraftLen(
            DraftPolicyConfig(policy="adaptive", max_draft_len=self.args.router.max_draft_len)
        )
        self._router: Any = None

    # -- helpers --------------------------------------------------------------------------------
    def _apply_link(self, bandwidth_bps: float | None, rtt_s: float | None) -> None:
        if bandwidth_bps is None or rtt_s is None:
            return
        if (bandwidth_bps, rtt_s) != self._link_settings:
            self.link.set_conditions(bandwidth_bps, rtt_s)
            self._link_settings = (bandwidth_bps, rtt_s)

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
            report.verify_samples = [(k + 1, v) for k, v in zip(trace.draft_lens[1:], trace.round_verify_s[1:],
                                                                 strict=True)]
            report.link_samples = [(b, s) for b, s in zip(trace.round_bytes, trace.round_link_s, strict=True)]
        elif trace.path == "on-device" and trace.num_tokens > 1:
            report.on_device_s_per_token = trace.tpot_s
        elif trace.path == "server-only" and trace.num_tokens > 1:
            report.server_only_s_per_token = trace.tpot_s
        try:
            self._router = self._router or router_handle(self.args)
            self._router.report_generation.remote(report)  # fire and forget: off the hot path
        except Exception as exc:
            log.warning("could not report to the router: %s", exc)

    def _run(self, request: dict[str, Any], cancel: threading.Event,
             on_tokens: Any = None) -> GenerationResult:
        opts = GenerateOptions.model_validate(request["options"])
        self._apply_link(request.get("link_bandwidth_bps"), request.get("link_rtt_s"))

        def on_round(_round: int, emitted: list[int]) -> None:
            if cancel.is_set():
                raise Cancelled()
            if on_tokens is not None:
                on_tokens(emitted)

        with self._engine_lock:
            if cancel.is_set():
                raise Cancelled()
            if opts.path == "on-device":
                ids = self.engine.encode_prompt(opts.prompt_input(), opts.chat)
                result = self.device.generate_local(ids, opts.max_new_tokens, opts.sampling,
                                                    on_token=on_round)
            elif opts.path == "server-only":
                transport = ServeTransport(self.edge_handle, self.link)
                result = generate_server_only(opts.prompt_input(), opts.chat, opts.max_new_tokens, opts.sampling,
                                              transport, self.engine.decode, on_token=on_round)
            else:
                ids = self.engine.encode_prompt(opts.prompt_input(), opts.chat)
                transport = ServeTransport(self.edge_handle, self.link)
                policy: Any = self.policy
                if opts.draft_len != "auto":
                    policy = FixedDraftLen(opts.draft_policy())
                result = self.device.generate_speculative(ids, opts.max_new_tokens, opts.sampling, policy,
                                                          transport, on_round=on_round)
        self._report(request.get("link_id", "device-0"), result)
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

    async def set_link(self, bandwidth_bps: float, rtt_s: float) -> None:
        self._apply_link(bandwidth_bps, rtt_s)

    async def check_health(self) -> None:
        return None
