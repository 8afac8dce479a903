"""The ingress: FastAPI through Ray Serve. Native ``/v1/generate`` plus an OpenAI-compatible subset.

Every request asks the Router for a path and draft length (one call per request), runs on the
chosen tier, and records metrics from the returned trace. Errors map to 4xx naming the field,
503 with Retry-After when no tier can serve, never a bare 500 for client mistakes.
"""

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from ray.serve.exceptions import BackPressureError

from aiflow_ray import envs
from aiflow_ray.api import metrics
from aiflow_ray.api.schemas import ChatBody, CompletionBody, GenerateBody, KbIngestBody, KbSearchBody, LinkUpdate
from aiflow_ray.config import GenerateOptions, GroundingOptions, LinkConfig, SamplingConfig
from aiflow_ray.serve.args import AppArgs
from aiflow_ray.units import parse_bandwidth_bps

OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.retry_after_s = status, message, field, retry_after_s


def _error(status: int, message: str, field: str | None = None, retry_after_s: int | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "unavailable",
                      "param": field, "code": status}}
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.field, exc.retry_after_s)


async def _overloaded(_request: Request, _exc: Exception) -> JSONResponse:
    # Serve refused to queue more work for a tier (max_queued_requests): the client should back off.
    return _error(503, "the cluster is at capacity; retry shortly", None, 1)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    return _error(422 if loc else 400, f"{field}: {first.get('msg')}", field)


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Bearer auth (when AIFLOW_API_KEY is set) and a request body size limit (pure ASGI).

    The limit holds for chunked bodies too: Content-Length is checked up front, and the bytes
    actually received are counted as the application reads them.
    """

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = envs.api_key()
        if key and scope.get("path", "") not in OPEN_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                await _error(401, "missing or wrong API key (Authorization: Bearer <key>)", "authorization")(
                    scope, receive, send)
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _error(413, f"request body over {self.max_body_bytes} bytes", "body")(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if started:
                raise
            await _error(413, f"request body over {self.max_body_bytes} bytes", "body")(scope, receive, send)


class Ingress:
    """The ingress logic; ``make_ingress`` binds it to a FastAPI app for ``serve.ingress``."""

    def __init__(self, args: dict[str, Any], device: Any, cloud: Any, router: Any) -> None:
        self.args = AppArgs.model_validate(args)
        self.device, self.cloud, self.router = device, cloud, router
        pair = self.args.model_pair()
        self.model_ids = [pair.verifier, pair.drafter, "aiflow"]

    # -- plumbing -------------------------------------------------------------------------------
    def _check_tokens(self, max_tokens: int, field: str) -> None:
        if max_tokens > self.args.max_new_tokens_limit:
            raise ApiError(400, f"{field} must be at most {self.args.max_new_tokens_limit}", field)

    async def _decide(self, body: GenerateBody, messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
        from aiflow_ray.routing.policy import RouteError

        fixed = body.draft_len if isinstance(body.draft_len, int) else None
        # What crosses the link before the first token: the raw input (chat turns as their text).
        prompt_bytes = sum(len(m["content"].encode()) for m in messages) if messages else len(body.prompt.encode())
        try:
            decision: dict[str, Any] = await self.router.decide.remote(
                uuid.uuid4().hex, body.link_id, body.path, body.quality, fixed, prompt_bytes, body.max_tokens
            )
        except RouteError as exc:
            raise ApiError(400, str(exc), "path") from None
        except Exception as exc:
            if "cannot give quality" in str(exc):
                raise ApiError(400, str(exc).splitlines()[-1], "path") from None
            raise
        metrics.DECISIONS.labels(str(decision["path"])).inc()
        if decision["path"] is None:
            metrics.REQUESTS.labels("none", "503").inc()
            raise ApiError(503, f"no tier can serve this request now: {decision['reason']}", None, 1)
        return decision

    def _tier_request(self, body: GenerateBody, decision: dict[str, Any], messages: list[dict[str, str]] | None
                      ) -> dict[str, Any]:
        path = decision["path"]
        draft_len: int | str = "auto"
        if isinstance(body.draft_len, int):
            draft_len = body.draft_len
        elif body.draft_len is None and decision["draft_len"] >= 1:
            draft_len = decision["draft_len"]
        opts = GenerateOptions(
            prompt=body.prompt, messages=messages, path=path, draft_len=draft_len, max_new_tokens=body.max_tokens,
            chat=body.chat,
            sampling=SamplingConfig(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed),
            link=LinkConfig(**decision["emulated_link"]),
            grounding=GroundingOptions(
                top_k=body.retrieval_top_k, generation=body.generation, beam_width=body.beam_width,
                length_penalty=body.length_penalty, query_encoding=body.query_encoding,
            ) if path == "device-edge-cloud" else None,
        )
        return {"options": opts.model_dump(mode="json"), "link_id": body.link_id,
                "link_bandwidth_bps": decision["emulated_link"]["bandwidth_bps"],
                "link_rtt_s": decision["emulated_link"]["rtt_s"]}

    async def _run(self, body: GenerateBody, messages: list[dict[str, str]] | None = None,
                   decision: dict[str, Any] | None = None) -> dict[str, Any]:
        self._check_tokens(body.max_tokens, "max_tokens")
        started = time.perf_counter()
        decision = decision or await self._decide(body, messages)
        result = await self.device.generate.remote(self._tier_request(body, decision, messages))
        if result["trace"].get("retrieval"):
            result["sources"] = result["trace"]["retrieval"]["hits"]
        result["trace"]["reason"] = decision["reason"]
        result["trace"]["router_draft_len"] = decision["draft_len"]
        result["trace"]["e2e_s"] = time.perf_counter() - started
        metrics.observe(result["trace"])
        metrics.REQUESTS.labels(result["trace"]["path"], "200").inc()
        return result

    async def _open_stream(self, body: GenerateBody, messages: list[dict[str, str]] | None,
                           shape: Any) -> StreamingResponse:
        """Decide before the response starts, so refusals keep their 4xx/503 status."""
        self._check_tokens(body.max_tokens, "max_tokens")
        decision = await self._decide(body, messages)
        return StreamingResponse(self._sse(self._stream(body, messages, decision), shape),
                                 media_type="text/event-stream")

    async def _stream(self, body: GenerateBody, messages: list[dict[str, str]] | None,
                      decision: dict[str, Any]) -> AsyncIterator[dict]:
        stream = self.device.options(stream=True).generate_stream.remote(
            self._tier_request(body, decision, messages))
        try:
            async for event in stream:
                if event.get("done"):
                    event["trace"]["reason"] = decision["reason"]
                    metrics.observe(event["trace"])
                    metrics.REQUESTS.labels(event["trace"]["path"], "200").inc()
                yield event
        finally:
            stream.cancel()  # the client went away: stop generating

    # -- native API -----------------------------------------------------------------------------
    async def generate(self, body: GenerateBody) -> Any:
        if body.stream:
            return await self._open_stream(body, None, lambda e: e)
        return await self._run(body)

    async def router_state(self) -> Any:
        return await self.router.snapshot.remote()

    async def set_link(self, link_id: str, update: LinkUpdate) -> Any:
        if update.bandwidth_bps is None and update.bandwidth is None:
            raise ApiError(422, "give bandwidth_bps or bandwidth", "bandwidth_bps")
        try:
            bps = update.bandwidth_bps or parse_bandwidth_bps(update.bandwidth or "")
        except ValueError as exc:
            raise ApiError(422, str(exc), "bandwidth") from None
        settings = await self.router.set_emulated_link.remote(link_id, bps, update.rtt_ms / 1000.0)
        return {"link_id": link_id, **settings}

    async def healthz(self) -> Any:
        return {"status": "ok"}

    # -- knowledge base -------------------------------------------------------------------------
    async def kb_search(self, body: KbSearchBody) -> Any:
        started = time.perf_counter()
        out = await self.cloud.retrieve.remote({"query": body.query, "top_k": body.top_k})
        return {"hits": out["hits"], "num_chunks": out["num_chunks"], "embed_s": out["embed_s"],
                "search_s": out["search_s"], "e2e_s": time.perf_counter() - started}

    async def kb_ingest(self, body: KbIngestBody) -> Any:
        return await self.cloud.ingest.remote({"documents": [d.model_dump() for d in body.documents]})

    async def kb_stats(self) -> Any:
        return await self.cloud.kb_stats.remote()

    async def readyz(self) -> Any:
        """Ready once every tier has reported: the edge and cloud their load, the device its calibration.

        /healthz answers as soon as the ingress runs; the tiers may still be loading their models.
        """
        snap = await self.router.snapshot.remote()
        waiting = [tier for tier in ("edge", "cloud") if not snap["loads"].get(tier, {}).get("available")]
        if snap.get("draft_s_per_token") is None:
            waiting.append("device")
        if waiting:
            return JSONResponse({"status": "starting", "waiting_for": waiting}, status_code=503,
                                headers={"Retry-After": "2"})
        return {"status": "ready"}

    async def metrics_endpoint(self) -> Any:
        return PlainTextResponse(generate_latest(metrics.REGISTRY).decode(), media_type="text/plain; version=0.0.4")

    # -- OpenAI-compatible ----------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise ApiError(404, f"model {model!r} not found; served: {', '.join(self.model_ids)}", "model")

    async def models(self) -> Any:
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "aiflow"}
                                            for m in self.model_ids]}

    @staticmethod
    def _apply_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        cut = min((text.find(s) for s in stops if s and s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _native(self, model: str, prompt: str, max_tokens: int, temperature: float, top_p: float,
                seed: int | None, stream: bool, chat: bool) -> GenerateBody:
        quality = "fast" if model == self.model_ids[1] else "exact"
        path = "on-device" if quality == "fast" else "auto"
        return GenerateBody(prompt=prompt, path=path, quality=quality, max_tokens=max_tokens,
                            temperature=temperature, top_p=top_p, seed=seed, stream=stream, chat=chat)

    async def completions(self, body: CompletionBody) -> Any:
        self._check_model(body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        native = self._native(body.model, prompt, body.max_tokens, body.temperature, body.top_p, body.seed,
                              body.stream, chat=False)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(event: dict[str, Any]) -> dict[str, Any]:
            finish = ("length" if event.get("num_tokens", 0) >= body.max_tokens else "stop") if event.get("done") \
                else None
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": event.get("text", ""), "finish_reason": finish,
                                 "logprobs": None}]}

        if body.stream:
            return await self._open_stream(native, None, chunk)
        result = await self._run(native)
        text, stopped = self._apply_stop(result["text"], body.stop)
        finish = "stop" if stopped or len(result["token_ids"]) < body.max_tokens else "length"
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": {"completion_tokens": len(result["token_ids"])}, "aiflow_trace": result["trace"]}

    async def chat_completions(self, body: ChatBody) -> Any:
        self._check_model(body.model)
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        messages = [m.model_dump() for m in body.messages]
        last_user = next(m.content for m in reversed(body.messages) if m.role == "user")
        native = self._native(body.model, last_user, max_tokens, body.temperature, body.top_p, body.seed,
                              body.stream, chat=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        first = {"sent": False}

        def chunk(event: dict[str, Any]) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": event.get("text", "")}
            if not first["sent"]:
                delta["role"] = "assistant"
                first["sent"] = True
            finish = ("length" if event.get("num_tokens", 0) >= max_tokens else "stop") if event.get("done") \
                else None
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if body.stream:
            return await self._open_stream(native, messages, chunk)
        result = await self._run(native, messages)
        text, stopped = self._apply_stop(result["text"], body.stop)
        finish = "stop" if stopped or len(result["token_ids"]) < max_tokens else "length"
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"completion_tokens": len(result["token_ids"])}, "aiflow_trace": result["trace"]}

    @staticmethod
    async def _sse(events: AsyncIterator[dict[str, Any]], shape: Any) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(shape(event))}\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps({'error': {'message': exc.message, 'code': exc.status}})}\n\n"
        yield "data: [DONE]\n\n"


def make_ingress(max_body_bytes: int) -> type:
    """A FastAPI app and the class Serve runs behind it, built together in one closure.

    Serve turns the class's route methods into class-based views when it builds the replica; the
    app travels with the class by value, so the replica sees exactly these routes and middleware.
    """
    from ray import serve

    api = FastAPI(title="aiflow-ray", version="0.1.0")
    api.add_middleware(GuardMiddleware, max_body_bytes=max_body_bytes)
    api.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    api.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    api.add_exception_handler(BackPressureError, _overloaded)

    class AiflowIngress(Ingress):
        @api.post("/v1/generate")
        async def generate_route(self, body: GenerateBody) -> Any:
            return await self.generate(body)

        @api.get("/v1/router")
        async def router_route(self) -> Any:
            return await self.router_state()

        @api.put("/v1/admin/links/{link_id}")
        async def set_link_route(self, link_id: str, update: LinkUpdate) -> Any:
            return await self.set_link(link_id, update)

        @api.post("/v1/kb/search")
        async def kb_search_route(self, body: KbSearchBody) -> Any:
            return await self.kb_search(body)

        @api.get("/v1/kb")
        async def kb_stats_route(self) -> Any:
            return await self.kb_stats()

        @api.post("/v1/admin/kb/documents")
        async def kb_ingest_route(self, body: KbIngestBody) -> Any:
            return await self.kb_ingest(body)

        @api.get("/healthz")
        async def healthz_route(self) -> Any:
            return await self.healthz()

        @api.get("/readyz")
        async def readyz_route(self) -> Any:
            return await self.readyz()

        @api.get("/metrics")
        async def metrics_route(self) -> Any:
            return await self.metrics_endpoint()

        @api.get("/v1/models")
        async def models_route(self) -> Any:
            return await self.models()

        @api.post("/v1/completions")
        async def completions_route(self, body: CompletionBody) -> Any:
            return await self.completions(body)

        @api.post("/v1/chat/completions")
        async def chat_route(self, body: ChatBody) -> Any:
            return await self.chat_completions(body)

    return serve.ingress(api)(AiflowIngress)
