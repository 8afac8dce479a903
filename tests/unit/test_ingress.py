"""The ingress over fake tier handles (no Ray): readiness, refusals as values, error bodies, OpenAI shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import RayActorError

from aiflow_ray.api.app import Ingress, build_api
from aiflow_ray.config import AppArgs, GenerateOptions, LinkConfig
from aiflow_ray.errors import Refusal
from aiflow_ray.routing.messages import Routed, RouteRequest
from aiflow_ray.routing.policy import Decision
from aiflow_ray.tiers.results import StreamDelta, StreamDone, TierResult, TokenLogprob
from aiflow_ray.tiers.trace import Trace
from tests.unit.fakes import FakeHandle

ARGS = AppArgs(model_preset="tiny").model_dump(mode="json")
READY = {"loads": {"edge": {"available": True}, "cloud": {"available": True}}, "draft_s_per_token": 0.01}
LEAKS = ("Traceback", "ray::", 'File "', ".py", "RayActorError", "Exception", "ServeReplica")


class Router:
    def __init__(self, ready: bool = True, refusal: Refusal | None = None) -> None:
        self.ready, self.refusal = ready, refusal
        self.requests: list[RouteRequest] = []

    async def snapshot(self) -> dict[str, Any]:
        return READY if self.ready else {"loads": {"edge": {"available": True}}, "draft_s_per_token": None}

    async def decide(self, req: RouteRequest) -> Routed:
        self.requests.append(req)
        path = None if self.refusal else ("on-device" if req.path == "on-device" else "device-edge")
        return Routed(Decision(path, 3, "because", {"on-device": 0.02}, {"on-device": 0.05}, refusal=self.refusal),
                      LinkConfig())


class Device:
    def __init__(self, failure: Refusal | Exception | None = None) -> None:
        self.failure = failure
        self.options: list[GenerateOptions] = []

    def _trace(self, opts: GenerateOptions, n: int) -> Trace:
        return Trace(path=opts.path, num_tokens=n, ttft_s=0.1, tpot_s=0.01, draft_lens=[3], accepted=[2], bytes_up=40,
                     bytes_down=30)

    async def generate(self, opts: GenerateOptions) -> TierResult | Refusal:
        self.options.append(opts)
        if isinstance(self.failure, Exception):
            raise self.failure
        if self.failure is not None:
            return self.failure
        lp = [TokenLogprob("a", -0.1, [97], [{"token": "a", "logprob": -0.1, "bytes": [97]}])] * 3 \
            if opts.logprobs is not None else None
        return TierResult("abc", [1, 2, 3], 7, self._trace(opts, 3), lp)

    async def generate_stream(self, opts: GenerateOptions) -> AsyncIterator[StreamDelta | StreamDone | Refusal]:
        self.options.append(opts)
        if isinstance(self.failure, Exception):
            raise self.failure
        if isinstance(self.failure, Refusal):
            yield self.failure
            return
        yield StreamDelta([1, 2], "ab")
        yield StreamDone("c", 3, 7, self._trace(opts, 3))


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIFLOW_API_KEY", raising=False)  # other tests may serve with one
    monkeypatch.delenv("AIFLOW_ADMIN_KEY", raising=False)


def _client(router: Router, device: Device) -> TestClient:
    ingress = Ingress(ARGS, FakeHandle(device), FakeHandle(object()), FakeHandle(router))
    return TestClient(build_api(ingress.args, lambda: ingress), raise_server_exceptions=False)


def test_requests_while_the_tiers_load_get_503_with_retry_after() -> None:
    client = _client(Router(ready=False), Device())
    for route, body in (("/v1/generate", {"prompt": "x"}),
                        ("/v1/chat/completions", {"model": "tiny-verifier", "messages": [{"role": "user",
                                                                                          "content": "x"}]})):
        response = client.post(route, json=body)
        assert response.status_code == 503 and response.headers["Retry-After"] == "2"
        assert "still starting (waiting for: device, cloud)" in response.json()["error"]["message"]
    assert client.get("/readyz").status_code == client.get("/readyz?serving=true").status_code == 503  # never ready
    assert client.get("/health").status_code == client.get("/healthz").status_code == 200


def test_readyz_for_a_load_balancer_keeps_a_degraded_application_in_service() -> None:
    """/readyz says 503 while a tier is down; ?serving=true (the Kubernetes probe, k8s/) says 200 once the
    application was ready, so a lost tier does not take the whole service out of rotation."""
    router = Router(ready=True)
    client = _client(router, Device())
    assert client.get("/readyz?serving=true").json() == {"status": "ready"}  # a probe, before any request
    router.ready = False  # a tier stops reporting
    degraded = client.get("/readyz")
    assert degraded.status_code == 503 and degraded.json()["status"] == "degraded"
    serving = client.get("/readyz?serving=true")
    assert serving.status_code == 200 and serving.json()["waiting_for"] == ["device", "cloud"]


@pytest.mark.parametrize("refusal", [Refusal(400, "path 'on-device' cannot give quality 'exact'", "quality"),
                                     Refusal(503, "no tier can serve this request now: edge saturated", None, 1)])
def test_router_refusals_reach_the_client_as_one_sentence(refusal: Refusal) -> None:
    response = _client(Router(refusal=refusal), Device()).post("/v1/generate", json={"prompt": "x"})
    assert response.status_code == refusal.status
    assert response.json()["error"] == {"message": refusal.message, "param": refusal.field, "code": refusal.status,
                                        "type": "invalid_request_error" if refusal.status < 500 else "unavailable"}
    assert (response.headers.get("Retry-After") == "1") == (refusal.status == 503)


@pytest.mark.parametrize("failure", [Refusal(503, "the edge or cloud tier failed during this request", None, 1),
                                     RayActorError()])
def test_tier_failures_are_503_without_internals(failure: Any) -> None:
    client = _client(Router(), Device(failure))
    response = client.post("/v1/generate", json={"prompt": "x"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert not any(leak in response.text for leak in LEAKS), response.text
    streamed = client.post("/v1/generate", json={"prompt": "x", "stream": True})
    assert streamed.status_code == 503  # refused before the stream started: the status says so


def test_a_forced_path_carries_no_quality_and_options_are_typed() -> None:
    router, device = Router(), Device()
    body = _client(router, device).post("/v1/generate", json={"prompt": "x", "path": "on-device", "ignore_eos": True,
                                                              "max_tokens": 9}).json()
    assert router.requests[-1].path == "on-device" and router.requests[-1].quality is None
    assert body["route"] == {"path": "on-device", "reason": "because", "draft_len": 3, "predicted_ttft_s": 0.05,
                             "predicted_tpot_s": 0.02}
    # The ingress names the request's class for the router from its text alone.
    assert router.requests[-1].request_class == "text:prose"
    assert body["trace"]["path"] == "on-device" and "reason" not in body["trace"]  # the tier's trace, untouched
    opts = device.options[-1]
    assert opts.min_tokens == 9 and opts.link == LinkConfig() and opts.path == "on-device"


def test_chat_content_parts_usage_and_logprobs() -> None:
    router, device = Router(), Device()
    client = _client(router, device)
    response = client.post("/v1/chat/completions", json={
        "model": "tiny-verifier", "max_completion_tokens": 3, "logprobs": True, "top_logprobs": 1,
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]})
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert out["choices"][0]["finish_reason"] == "length"
    assert [e["token"] for e in out["choices"][0]["logprobs"]["content"]] == ["a"] * 3
    opts = device.options[-1]
    assert opts.messages is not None and [t.model_dump() for t in opts.messages] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert opts.logprobs == 1 and router.requests[-1].needs_logprobs
    assert router.requests[-1].prompt_bytes == len("be brief") + len("hello")


def test_stream_include_usage_sends_a_last_usage_chunk() -> None:
    client = _client(Router(), Device())
    response = client.post("/v1/completions", json={"model": "tiny-verifier", "prompt": "x", "max_tokens": 3,
                                                    "stream": True, "ignore_eos": True,
                                                    "stream_options": {"include_usage": True,
                                                                       "continuous_usage_stats": True}})
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert response.text.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "abc"
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["usage"] is None
    assert events[-1]["choices"] == [] and events[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3,
                                                                   "total_tokens": 10}


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/generate", {"prompt": "x", "surprise": 1}, "surprise"),
        ("/v1/generate", {"prompt": "x", "path": "teleport"}, "path"),
        ("/v1/generate", {"prompt": "x", "draft_len": "many"}, "draft_len"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages.0.content.0.image_url"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
         "messages.0.content.0"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
         "body"),
        ("/v1/completions", {"model": "m", "prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"model": "m", "prompt": "x", "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    ],
)
def test_bad_input_names_the_field(route: str, body: dict[str, Any], field: str) -> None:
    response = _client(Router(), Device()).post(route, json=body)
    assert response.status_code == 400, response.text  # as OpenAI's API and vLLM answer
    assert response.json()["error"]["param"] == field, response.text
    assert not any(leak in response.text for leak in LEAKS), response.text


def test_client_values_echoed_in_errors_are_bounded_and_escaped() -> None:
    client = _client(Router(), Device())
    model = "m\n" + "x" * 5000
    unknown = client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}]})
    assert unknown.status_code == 404 and len(unknown.json()["error"]["message"]) < 250
    assert "\n" not in unknown.json()["error"]["message"] and "m\\nxxx" in unknown.json()["error"]["message"]
    extra = client.post("/v1/generate", json={"prompt": "x", "k" * 5000: 1})
    assert extra.status_code == 400 and len(extra.json()["error"]["param"]) < 150
    bandwidth = client.put("/v1/admin/links/l1", json={"bandwidth": "\x1b" + "9" * 5000 + "zz", "rtt_ms": 1})
    assert bandwidth.status_code == 400 and bandwidth.json()["error"]["param"] == "bandwidth"
    assert len(bandwidth.json()["error"]["message"]) < 250 and "\x1b" not in bandwidth.json()["error"]["message"]


class FlakyDevice(Device):
    """Dies (as a replica would) on the first ``deaths`` calls, then answers."""

    def __init__(self, deaths: int) -> None:
        super().__init__()
        self.deaths = deaths

    async def generate(self, opts: GenerateOptions) -> TierResult | Refusal:
        if self.deaths:
            self.deaths -= 1
            raise RayActorError()
        return await super().generate(opts)


def test_a_device_replica_dying_before_it_answers_gets_one_retry() -> None:
    device = FlakyDevice(deaths=1)
    response = _client(Router(), device).post("/v1/generate", json={"prompt": "x"})
    assert response.status_code == 200 and response.json()["text"] == "abc"
    assert len(device.options) == 1 and device.deaths == 0


class DeadRouter(Router):
    async def snapshot(self) -> dict[str, Any]:
        return READY

    async def decide(self, req: RouteRequest) -> Routed:
        raise RayActorError()


def test_without_a_router_the_ingress_decides_from_the_saved_state() -> None:
    response = _client(DeadRouter(), Device()).post("/v1/generate", json={"prompt": "x", "max_tokens": 8})
    assert response.status_code == 200, response.text
    assert response.json()["route"]["reason"].startswith("decided by the ingress (router unavailable")


class BreakingStreamDevice(Device):
    async def generate_stream(self, opts: GenerateOptions) -> AsyncIterator[StreamDelta | StreamDone | Refusal]:
        yield StreamDelta([1, 2], "ab")
        raise RayActorError()


def test_a_stream_broken_after_it_started_ends_with_an_error_event_not_a_reset() -> None:
    response = _client(Router(), BreakingStreamDevice()).post("/v1/generate", json={"prompt": "x", "stream": True})
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert events[0]["text"] == "ab" and events[-1]["error"]["code"] == 503
    assert response.text.rstrip().endswith("data: [DONE]")
    assert not any(leak in response.text for leak in LEAKS)


def test_an_admin_link_id_is_validated_like_a_body_one() -> None:
    response = _client(Router(), Device()).put("/v1/admin/links/bad%20id", json={"bandwidth_bps": 1000})
    assert response.status_code == 400 and response.json()["error"]["param"] == "link_id"


def test_serve_cannot_replace_our_back_pressure_answer() -> None:
    from fastapi.responses import PlainTextResponse
    from ray.serve.exceptions import BackPressureError

    ingress = Ingress(ARGS, FakeHandle(Device()), FakeHandle(object()), FakeHandle(Router()))
    api = build_api(ingress.args, lambda: ingress)

    @api.get("/overloaded")
    async def overloaded() -> None:
        raise BackPressureError(num_queued_requests=9, max_queued_requests=8)

    # What Serve does when the replica starts: its own handler, a plain-text 503 without Retry-After.
    api.add_exception_handler(BackPressureError, lambda _r, exc: PlainTextResponse(str(exc), status_code=503))
    response = TestClient(api, raise_server_exceptions=False).get("/overloaded")
    assert response.status_code == 503 and response.headers["Retry-After"] >= "1"
    assert response.json()["error"]["type"] == "unavailable"


def test_an_unexpected_error_is_a_json_500_and_a_dead_tier_a_json_503() -> None:
    ingress = Ingress(ARGS, FakeHandle(Device()), FakeHandle(object()), FakeHandle(Router()))
    api = build_api(ingress.args, lambda: ingress)

    @api.get("/bug")
    async def bug() -> None:
        raise KeyError("boom")

    @api.get("/dead")
    async def dead() -> None:
        raise RayActorError()

    client = TestClient(api, raise_server_exceptions=False)
    assert client.get("/bug").status_code == 500 and client.get("/bug").json()["error"]["code"] == 500
    response = client.get("/dead")
    assert response.status_code == 503 and response.headers["Retry-After"] == "1" and "error" in response.json()
