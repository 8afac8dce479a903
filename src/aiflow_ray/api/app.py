"""The ingress: FastAPI through Ray Serve. Native ``/v1/generate`` plus an OpenAI-compatible subset.

Every generation asks the Router for a path and draft length (one typed call per request), runs on
the device tier (which orchestrates every path), and records metrics from the returned trace.
Refusals (the router's or a tier's) arrive as values and become one-sentence errors: 4xx naming the
field for client mistakes, 503 with Retry-After when no tier can serve now (also while the tiers are
still loading). The trace is the tier's own; the ingress adds its routing decision beside it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Path
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from aiflow_ray import calls
from aiflow_ray.api import metrics
from aiflow_ray.api.client_timeout import client_timeout
from aiflow_ray.api.errors import AiflowAPI, ApiError, GuardMiddleware, install_error_handlers, refusal_error
from aiflow_ray.api.images import RemoteImages, request_images
from aiflow_ray.api.openai_compat import OpenAIRequest
from aiflow_ray.api.schemas import (
    ERROR_RESPONSES,
    LINK_ID_PATTERN,
    STREAMED,
    ChatBody,
    CompletionBody,
    GenerateBody,
    KbIngestBody,
    KbSearchBody,
    LinkUpdate,
)
from aiflow_ray.api.tier_calls import DEVICE_GRACE_S, TierCalls
from aiflow_ray.config import TIERS, AppArgs, GenerateOptions, GroundingOptions, SamplingConfig
from aiflow_ray.config.generation import ImageSource
from aiflow_ray.errors import Refusal
from aiflow_ray.logging_utils import clip, get_logger
from aiflow_ray.models.registry import model_modalities
from aiflow_ray.routing.classes import request_class
from aiflow_ray.routing.messages import Routed, RouteRequest
from aiflow_ray.routing.policy import Decision
from aiflow_ray.routing.router import RouterState
from aiflow_ray.tiers.results import StreamDelta, StreamDone, TierResult

log = get_logger(__name__)

Messages = list[dict[str, str]] | None



def _prompt_bytes(body: GenerateBody, messages: Messages) -> int:
    # What crosses the link before the first token, besides images: the text (chat turns as their text).
    return sum(len(m["content"].encode()) for m in messages) if messages else len(body.prompt.encode())


class Ingress(TierCalls):
    """The ingress logic over three handles (device tier, cloud tier, router); ``build_api`` serves it."""

    def __init__(self, args: dict[str, Any], device: Any, cloud: Any, router: Any) -> None:
        self.args = AppArgs.model_validate(args)
        self.device, self.cloud, self.router = device, cloud, router
        pair = self.args.model_pair()
        self.drafter_name = pair.drafter
        self.model_ids = [pair.verifier, pair.drafter, "aiflow"]
        # The pair takes images only if both models do (the device drafts on the image too).
        modalities = set(model_modalities(pair.verifier)) & set(model_modalities(pair.drafter))
        self.modalities = ["text", "image"] if "image" in modalities else ["text"]
        self._ready = False
        self.remote_images = RemoteImages(self.args.images) if self.args.images.allow_remote_urls else None
        self._fallback: tuple[float, RouterState, dict[str, Any]] | None = None

    # -- readiness ------------------------------------------------------------------------------
    async def _waiting_for(self) -> list[str]:
        """Tiers that have not reported (lately): the edge and cloud their load, the device its calibration."""
        try:
            snap = await self._router_call("snapshot")
        except calls.TierUnavailable:
            return ["router"]
        waiting: list[str] = [t for t in TIERS if t != "device" and not snap["loads"].get(t, {}).get("available")]
        if snap.get("draft_s_per_token") is None:
            waiting.insert(0, "device")
        return waiting

    async def _ensure_ready(self) -> None:
        # Once every tier has reported, later outages are the router's to judge (it sees stale loads).
        if self._ready:
            return
        waiting = await self._waiting_for()
        if waiting:
            raise ApiError(503, f"the tiers are still starting (waiting for: {', '.join(waiting)}); retry shortly",
                           None, 2)
        self._ready = True

    # -- generation -----------------------------------------------------------------------------
    async def _images(self, body: GenerateBody, fields: list[str] | None = None) -> tuple[ImageSource, ...]:
        return await request_images(body.images, fields, self.modalities, self.args.images, self.remote_images)

    async def _route(self, body: GenerateBody, messages: Messages, images: tuple[ImageSource, ...] = ()) -> Routed:
        if body.max_tokens > self.args.max_new_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {self.args.max_new_tokens_limit}", "max_tokens")
        await self._ensure_ready()
        timeout_s, first_byte = client_timeout(body.stream)
        request = RouteRequest(
            request_id=uuid.uuid4().hex, link_id=body.link_id, path=body.path, quality=body.quality,
            draft_len=body.draft_len if isinstance(body.draft_len, int) else None,
            prompt_bytes=_prompt_bytes(body, messages), image_bytes=tuple(len(image.data) for image in images),
            max_new_tokens=body.max_tokens, needs_logprobs=body.logprobs is not None,
            client_timeout_s=timeout_s, client_timeout_first_byte=first_byte,
            request_class=request_class(messages[-1]["content"] if messages else body.prompt, len(images)))
        try:
            routed: Routed = await self._router_call("decide", request)
        except calls.TierUnavailable as exc:
            routed = await self._decide_without_router(request, exc)
        decision = routed.decision
        metrics.DECISIONS.labels(str(decision.path)).inc()
        if decision.refusal is not None:
            metrics.REQUESTS.labels("none", str(decision.refusal.status)).inc()
            raise refusal_error(decision.refusal)
        return routed

    def _options(self, body: GenerateBody, routed: Routed, messages: Messages,
                 images: tuple[ImageSource, ...] = ()) -> GenerateOptions:
        decision = routed.decision
        assert decision.path is not None
        draft_len: int | str = "auto"
        if isinstance(body.draft_len, int):
            draft_len = body.draft_len
        elif body.draft_len is None and decision.draft_len >= 1:
            draft_len = decision.draft_len
        return GenerateOptions(
            prompt=body.prompt, messages=messages, path=decision.path, draft_len=draft_len,
            max_new_tokens=body.max_tokens, chat=body.chat, link=routed.link, link_id=body.link_id,
            sampling=SamplingConfig(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed),
            grounding=GroundingOptions(
                top_k=body.retrieval_top_k, generation=body.generation, beam_width=body.beam_width,
                length_penalty=body.length_penalty, query_encoding=body.query_encoding,
            ) if decision.path == "device-edge-cloud" else None,
            min_tokens=body.max_tokens if body.ignore_eos else min(body.min_tokens, body.max_tokens),
            logprobs=body.logprobs,
            # Only 'fast' accepts the small model's words; they carry no verifier log-probabilities.
            device_fallback=body.quality == "fast" and body.logprobs is None,
            deadline_s=self.args.deadlines.request_s,
            images=images, image_upload=body.image_upload,
            switch_tpot_s=self._switch_tpot_s(body, decision),
        )

    @staticmethod
    def _switch_tpot_s(body: GenerateBody, decision: Decision) -> float | None:
        """Server-only's predicted TPOT, for a device-edge request the router chose: the request re-decides
        at a round boundary when its own rounds measure slower (tiers/device.py, PathSwitch). A path the
        client named is kept."""
        if body.path != "auto" or decision.path != "device-edge":
            return None
        predicted = decision.predicted_tpot_s.get("server-only")
        return predicted if predicted is not None and predicted > 0 else None

    @staticmethod
    def _route_info(routed: Routed) -> dict[str, Any]:
        d = routed.decision
        return {"path": d.path, "reason": d.reason, "draft_len": d.draft_len,
                "predicted_ttft_s": d.predicted_ttft_s.get(str(d.path)), "predicted_tpot_s": d.predicted_tpot_s.get(
                    str(d.path))}

    async def run(self, body: GenerateBody, messages: Messages = None, image_fields: list[str] | None = None
                  ) -> tuple[TierResult, Routed, float]:
        started = time.perf_counter()
        images = await self._images(body, image_fields)
        routed = await self._route(body, messages, images)
        try:
            result = await self._call_device(self._options(body, routed, messages, images))
        except BaseException:
            self._report_end(routed)
            raise
        if isinstance(result, Refusal):
            self._report_end(routed)
            metrics.REQUESTS.labels(str(routed.decision.path), str(result.status)).inc()
            raise refusal_error(result)
        metrics.observe(result.trace, result.prompt_tokens)
        metrics.REQUESTS.labels(result.trace.path, "200").inc()
        self._report_outcome(routed, result.trace, result.prompt_tokens)
        return result, routed, time.perf_counter() - started


    async def open_stream(self, body: GenerateBody, messages: Messages,
                          shape: Callable[[StreamDelta | StreamDone, Routed], list[dict[str, Any]]],
                          image_fields: list[str] | None = None) -> StreamingResponse:
        """Decide, and wait for the first event, before the response starts: a refusal keeps its status."""
        images = await self._images(body, image_fields)
        routed = await self._route(body, messages, images)
        try:
            stream, first = await self._open_device_stream(self._options(body, routed, messages, images))
        except BaseException:
            self._report_end(routed)
            raise
        if isinstance(first, Refusal):
            self._report_end(routed)
            stream.cancel()
            raise refusal_error(first)

        deadline = time.monotonic() + self.args.deadlines.request_s + DEVICE_GRACE_S

        def error_event(message: str, status: int) -> str:
            return f"data: {json.dumps({'error': {'message': message, 'code': status}})}\n\n"

        async def events() -> AsyncIterator[str]:
            finished = False
            try:
                event = first
                while True:
                    if isinstance(event, Refusal):
                        yield error_event(event.message, event.status)
                        break
                    if isinstance(event, StreamDone):
                        metrics.observe(event.trace, event.prompt_tokens)
                        metrics.REQUESTS.labels(event.trace.path, "200").inc()
                        self._report_outcome(routed, event.trace, event.prompt_tokens)
                        finished = True
                    for out in shape(event, routed):
                        yield f"data: {json.dumps(out)}\n\n"
                    if isinstance(event, StreamDone):
                        break
                    try:
                        event = await asyncio.wait_for(stream.__anext__(), max(deadline - time.monotonic(), 0.1))
                    except Exception as exc:  # the status line is sent: the failure can only be an event
                        if not calls.is_retryable(exc):
                            log.exception("stream failed", exc_info=exc)
                        else:
                            log.warning("stream failed: the device tier %s", calls.describe(exc))
                        metrics.REQUESTS.labels(str(routed.decision.path), "503").inc()
                        yield error_event("the device tier failed during this request; retry it", 503)
                        break
                yield "data: [DONE]\n\n"
            finally:
                stream.cancel()  # the client went away: stop generating
                if not finished:
                    self._report_end(routed)

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- native API -----------------------------------------------------------------------------
    async def generate(self, body: GenerateBody) -> Any:
        if body.stream:
            def native(event: StreamDelta | StreamDone, routed: Routed) -> list[dict[str, Any]]:
                if isinstance(event, StreamDelta):
                    out: dict[str, Any] = {"token_ids": event.token_ids, "text": event.text}
                else:
                    out = {"done": True, "text": event.text, "token_ids": event.token_ids,
                           "num_tokens": event.num_tokens, "prompt_tokens": event.prompt_tokens,
                           "trace": event.trace.to_dict(), "route": self._route_info(routed)}
                if event.logprobs is not None:
                    out["logprobs"] = [e.to_dict() for e in event.logprobs]
                return [out]

            return await self.open_stream(body, None, native)
        result, routed, e2e_s = await self.run(body)
        out = {"text": result.text, "token_ids": result.token_ids, "prompt_tokens": result.prompt_tokens,
               "trace": result.trace.to_dict(), "route": self._route_info(routed), "e2e_s": e2e_s}
        if result.sources is not None:
            out["sources"] = result.sources
        if result.logprobs is not None:
            out["logprobs"] = [e.to_dict() for e in result.logprobs]
        return out

    async def readyz(self, serving: bool = False) -> Any:
        """Ready while every tier reports (its replicas alive, on live nodes) and the router answers; /healthz
        and /health answer as soon as the ingress runs. ``serving``: also 200 when degraded, i.e. ready once
        and still answering (on the paths left): the question a load balancer or a Kubernetes readiness probe
        asks, where a 503 would turn a lost tier into a lost service."""
        waiting = await self._waiting_for()
        if waiting:
            status = "degraded" if self._ready else "starting"
            return JSONResponse({"status": status, "waiting_for": waiting},
                                status_code=200 if serving and self._ready else 503, headers={"Retry-After": "2"})
        self._ready = True  # a probe may see the application ready before any request does
        return {"status": "ready"}

    async def kb_search(self, body: KbSearchBody) -> Any:
        started = time.perf_counter()
        out = await self._cloud_call("retrieve", {"query": body.query, "top_k": body.top_k})
        return {"hits": out.hit_dicts(), "num_chunks": out.num_chunks, "embed_s": out.embed_s,
                "search_s": out.search_s, "e2e_s": time.perf_counter() - started}

    async def kb_ingest(self, body: KbIngestBody) -> Any:
        return await self._cloud_call("ingest", {"documents": [d.model_dump() for d in body.documents]})

    async def kb_stats(self) -> Any:
        return await self._cloud_call("kb_stats")

    # -- OpenAI-compatible ----------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model in self.model_ids:
            return
        prefix = self.args.peer_models.get(model)
        if prefix is not None:
            raise ApiError(404, f"model '{model}' is served by another application of this server: use base URL "
                           f"{prefix}/v1 (e.g. http://<host>:<port>{prefix}/v1)", "model")
        raise ApiError(404, f"model '{clip(model)}' not found; served: {', '.join(self.model_ids)}", "model")

    async def models(self) -> Any:
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "aiflow",
                                             "input_modalities": self.modalities} for m in self.model_ids]}

    async def openai(self, body: ChatBody | CompletionBody) -> Any:
        self._check_model(body.model)
        req = OpenAIRequest.from_body(body, self.drafter_name)
        if body.stream:
            def shape(event: StreamDelta | StreamDone, _routed: Routed) -> list[dict[str, Any]]:
                if isinstance(event, StreamDelta):
                    return [req.chunk(event.text, event.logprobs)]
                out = [req.chunk(event.text, event.logprobs, event.num_tokens)]
                if req.include_usage:
                    out.append(req.usage_chunk(event.prompt_tokens, event.num_tokens))
                return out

            return await self.open_stream(req.native, req.messages, shape, req.image_fields)
        result, routed, _ = await self.run(req.native, req.messages, req.image_fields)
        return req.response(result.text, len(result.token_ids), result.prompt_tokens, result.logprobs,
                            result.trace.to_dict(),
                            self._route_info(routed))


def build_api(args: AppArgs, ingress: Callable[[], Ingress]) -> FastAPI:
    """The FastAPI app; ``ingress()`` returns the instance that serves it (the replica's, or a test's)."""
    api = AiflowAPI(title="aiflow-ray", version="0.1.0", responses=ERROR_RESPONSES)
    api.add_middleware(GuardMiddleware, max_body_bytes=args.max_body_bytes, rate_limit=args.rate_limit)
    install_error_handlers(api)

    @api.post("/v1/generate", responses=STREAMED)
    async def generate(body: GenerateBody) -> Any:
        return await ingress().generate(body)

    @api.get("/v1/router")
    async def router_state() -> Any:
        return await ingress().router_state()

    @api.put("/v1/admin/links/{link_id}")
    async def set_link(update: LinkUpdate,
                       link_id: str = Path(..., pattern=LINK_ID_PATTERN, description="Which device link.")) -> Any:
        return await ingress().set_link(link_id, update)

    @api.post("/v1/kb/search")
    async def kb_search(body: KbSearchBody) -> Any:
        return await ingress().kb_search(body)

    @api.get("/v1/kb")
    async def kb_stats() -> Any:
        return await ingress().kb_stats()

    @api.post("/v1/admin/kb/documents")
    async def kb_ingest(body: KbIngestBody) -> Any:
        return await ingress().kb_ingest(body)

    @api.get("/healthz")
    @api.get("/health")  # where vLLM's servers answer, and where benchmark tools look
    async def healthz() -> Any:
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"description": "Not ready: which tiers are starting or down.",
                                         "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def readyz(serving: bool = False) -> Any:
        return await ingress().readyz(serving)

    @api.get("/metrics", response_class=PlainTextResponse)
    async def metrics_endpoint() -> Any:
        return PlainTextResponse(await ingress().metrics_text(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    async def models() -> Any:
        return await ingress().models()

    @api.post("/v1/completions", responses=STREAMED)
    async def completions(body: CompletionBody) -> Any:
        return await ingress().openai(body)

    @api.post("/v1/chat/completions", responses=STREAMED)
    async def chat(body: ChatBody) -> Any:
        return await ingress().openai(body)

    return api


def make_ingress() -> type:
    """The class Serve runs as the ingress. Serve builds its FastAPI app in the replica, after the
    constructor (``__serve_build_asgi_app__``), so the app's routes serve that very instance, with the
    arguments it validated."""
    from ray import serve

    class AiflowIngress(Ingress):
        def __serve_build_asgi_app__(self) -> FastAPI:
            return build_api(self.args, lambda: self)

    return serve.ingress()(AiflowIngress)
