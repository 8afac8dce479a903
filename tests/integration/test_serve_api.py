"""Every path end to end over HTTP on a real multi-node local Ray cluster with tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from aiflow_ray.config import AppArgs
from tests.integration.conftest import ADMIN_KEY, API_KEY

T = TypeVar("T")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT = "def fibonacci(n):"
PROMPT_CLASS = "text:code"  # routing/classes.py
# About 2.4 KB of code context: the raw input a slow link has to carry before the first token.
LONG_PROMPT = "# helpers\n" + "\n".join(f"def helper_{i}(x):\n    return x * {i} + {i % 7}" for i in range(60)) + "\n"


def _generate(api: httpx.Client, **body: object) -> httpx.Response:
    return api.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 24, **body})


def test_every_path_end_to_end(api: httpx.Client) -> None:
    outputs = {}
    for path in ("on-device", "device-edge", "server-only", "device-edge-cloud"):
        quality = {"on-device": "fast", "device-edge-cloud": "grounded"}.get(path, "exact")
        response = _generate(api, path=path, quality=quality, draft_len=4 if path == "device-edge" else None)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["trace"]["path"] == path
        assert len(body["token_ids"]) >= 1
        outputs[path] = body["token_ids"]
    # Exactness through the cluster: speculative output equals the large model alone (greedy, fp32).
    assert outputs["device-edge"] == outputs["server-only"]


def test_device_edge_trace_has_the_promised_fields(api: httpx.Client) -> None:
    body = _generate(api, path="device-edge", draft_len=3).json()
    trace = body["trace"]
    route = body["route"]
    assert {k: route[k] for k in ("path", "reason", "draft_len")} == {
        "path": "device-edge", "reason": "requested device-edge", "draft_len": 3}
    assert route["predicted_ttft_s"] > 0 and route["predicted_tpot_s"] > 0  # beside what the trace measures
    assert trace["path"] == "device-edge" and trace["num_tokens"] == len(body["token_ids"]) == 24
    assert trace["rounds"] >= 1 and set(trace["draft_lens"]) <= {0, 1, 2, 3}
    assert sum(trace["accepted"]) + trace["rounds"] >= 24  # every round emits its accepted tokens plus one
    # Only ids cross: each round's uplink is the header plus 4 bytes a draft token (the context once).
    assert 0 < trace["bytes_up"] < 64 * trace["rounds"] + 4 * (body["prompt_tokens"] + 24)
    assert trace["ttft_s"] > 0 and trace["draft_s"] > 0 and trace["verify_s"] > 0 and trace["link_s"] > 0


# Longer than any context (more tokens than characters' worth of context for every tokenizer here), though
# within the 100,000 characters the schema allows: refused after tokenizing, by the device tier.
OVER_CONTEXT_PROMPT = "".join(chr(0x4E00 + (i * 7919) % 20000) for i in range(40_000))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "draft_len": 0}, "draft_len"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "x", "path": "teleport"}, "path"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "surprise": 1}, "surprise"),
        ({"prompt": "x", "path": "on-device", "quality": "exact"}, "quality"),
        ({"prompt": "x", "path": "on-device", "quality": "grounded"}, "quality"),
        ({"prompt": "x", "path": "server-only", "quality": "grounded"}, "quality"),
        ({"prompt": "x", "path": "device-edge-cloud", "quality": "exact"}, "quality"),
        ({"prompt": "x", "path": "on-device", "logprobs": 2}, "logprobs"),
        ({"prompt": "x", "quality": "grounded", "logprobs": 0}, "logprobs"),
        ({"prompt": "x", "logprobs": 99}, "logprobs"),
        ({"prompt": OVER_CONTEXT_PROMPT}, "prompt"),
        ({"prompt": OVER_CONTEXT_PROMPT, "path": "device-edge-cloud"}, "prompt"),
    ],
    ids=lambda v: f"{len(v['prompt'])} chars" if isinstance(v, dict) and len(v.get("prompt", "")) > 1000 else None,
)
def test_bad_input_gets_4xx_naming_the_field(api: httpx.Client, body: dict, field: str) -> None:
    response = api.post("/v1/generate", json=body, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == field, response.text
    assert_no_internals(response.text)


def assert_no_internals(text: str) -> None:
    """An error body is one sentence for a client: no traceback, file path or internal class name."""
    for leak in ("Traceback", "ray::", 'File "', ".py", "Error:", "RouteError", "ServeReplica", "Exception"):
        assert leak not in text, f"{leak!r} leaks into {text!r}"
    assert len(text) < 600


def test_a_forced_path_without_quality_just_runs(api: httpx.Client) -> None:
    for path in ("on-device", "device-edge", "server-only"):
        response = _generate(api, path=path, max_tokens=6)
        assert response.status_code == 200, response.text
        assert response.json()["trace"]["path"] == path


def test_malformed_json_and_oversized_body(api: httpx.Client) -> None:
    response = api.post("/v1/generate", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
    over_limit = AppArgs().max_body_bytes + 1
    response = api.post("/v1/generate", content=b"x" * over_limit, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_openai_client_chat_and_completions(serve_url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY)
    models = [m.id for m in client.models.list().data]
    assert "tiny-verifier" in models
    chat = client.chat.completions.create(model="tiny-verifier", max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "Say hello"}])
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    streamed = client.chat.completions.create(model="tiny-verifier", max_tokens=12, temperature=0, stream=True,
                                              messages=[{"role": "user", "content": "Say hello"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    assert text == chat.choices[0].message.content
    completion = client.completions.create(model="tiny-verifier", prompt=PROMPT, max_tokens=10, temperature=0)
    assert completion.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nope", prompt=PROMPT, max_tokens=5)


def test_sse_stream_of_native_generate(api: httpx.Client) -> None:
    events = []
    with api.stream("POST", "/v1/generate", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 16, "path": "device-edge", "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert events[-1]["done"] and events[-1]["num_tokens"] == 16
    whole = _generate(api, path="device-edge", max_tokens=16).json()["text"]
    assert "".join(e["text"] for e in events) == whole


def _poll(check: Callable[[], T | None], deadline_s: float, what: str) -> T:
    """Call ``check`` until it returns something truthy; fail naming ``what`` after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {deadline_s:.0f} s")
        time.sleep(0.5)


def _set_link(admin_api: httpx.Client, link_id: str, bandwidth: str, rtt_ms: float = 2) -> None:
    admin_api.put(f"/v1/admin/links/{link_id}", json={"bandwidth": bandwidth, "rtt_ms": rtt_ms}).raise_for_status()


def test_router_estimates_follow_the_emulated_link(api: httpx.Client, admin_api: httpx.Client) -> None:
    """The router never reads the emulator: its estimate comes from measured rounds and probes."""
    link = "estimates"

    def estimate_in(low_bps: float, high_bps: float) -> float | None:
        est = api.get("/v1/router").json()["links"].get(link)
        return est["bandwidth_bps"] if est and low_bps < est["bandwidth_bps"] < high_bps else None

    _set_link(admin_api, link, "2MB/s")
    assert _generate(api, path="device-edge", link_id=link).status_code == 200  # the device meets the link
    _poll(lambda: estimate_in(100e3, float("inf")), 30, "an estimate above 100 KB/s on a 2 MB/s link")
    _set_link(admin_api, link, "10KB/s")
    slow = _poll(lambda: estimate_in(5e3, 20e3), 30, "an estimate near 10 KB/s after the drop")
    body = _generate(api, path="auto", quality="exact", link_id=link).json()
    decision = api.get("/v1/router").json()["recent_decisions"][-1]
    assert decision["path"] == body["trace"]["path"] and decision["reason"] == body["route"]["reason"]
    assert decision["inputs"]["bandwidth_bps"] == pytest.approx(slow, rel=0.5)
    _set_link(admin_api, link, "2MB/s")
    _poll(lambda: estimate_in(100e3, float("inf")), 30, "the estimate recovering with the link")


def test_the_router_sets_each_measured_outcome_beside_its_prediction(api: httpx.Client) -> None:
    """Every request's measured TTFT and TPOT reach the router beside what its decision predicted; the
    verify costs it predicts from are a curve over block size, non-negative and non-decreasing."""
    for path in ("server-only", "device-edge", "on-device"):
        response = _generate(api, path=path, quality="fast" if path == "on-device" else "exact",
                             link_id="outcomes", max_tokens=12)
        assert response.status_code == 200, response.text

    def errors() -> dict | None:
        found = api.get("/v1/router").json()["prediction_error"]
        return found if all(p in found for p in ("server-only", "device-edge", "on-device")) else None

    found = _poll(errors, 20, "measured outcomes of all three paths at the router")
    for path, error in found.items():
        assert error["requests"] >= 1 and error["ttft_error_median"] > -1.0, (path, error)
    measured = [d for d in api.get("/v1/router").json()["recent_decisions"] if d.get("measured")]
    assert measured and all(d["measured"]["path"] == d["path"] for d in measured)
    # The device-edge request's acceptance was learned for its class (what the ingress knows beforehand).
    assert PROMPT_CLASS in api.get("/v1/router").json()["alpha_by_class"]
    curve = api.get("/v1/router").json()["verify_curve"]
    assert curve and all(s >= 0 for _, s in curve)
    assert [s for _, s in curve] == sorted(s for _, s in curve) and [n for n, _ in curve] == sorted(n for n, _ in curve)


def test_fast_requests_leave_a_slow_link_for_the_device_and_come_back(api: httpx.Client,
                                                                       admin_api: httpx.Client) -> None:
    link = "fast-path"
    last: dict = {}

    def fast(expect: Callable[[str], bool]) -> dict | None:
        response = _generate(api, prompt=LONG_PROMPT, path="auto", quality="fast", link_id=link, max_tokens=12)
        assert response.status_code == 200, response.text
        last.update(route=response.json()["route"])
        return last["route"] if expect(last["route"]["path"]) else None

    def poll(expect: Callable[[str], bool], deadline_s: float, what: str) -> dict:
        try:
            return _poll(lambda: fast(expect), deadline_s, what)
        except AssertionError as exc:
            state = api.get("/v1/router").json()
            decision = next((d for d in reversed(state["recent_decisions"]) if d["link_id"] == link), None)
            raise AssertionError(f"{exc}; router saw {state['links'].get(link)}; last route {last.get('route')}; "
                                 f"its decision {decision}") from None

    # One long prompt served first, as traffic would have: the edge's calibration times prefills up to 128
    # tokens, and extrapolating that to 1607 over-prices a CPU's prefill (cheaper per token in larger blocks)
    # enough to miss the objective on a slow box; the router learns the real cost from this request.
    warm = _generate(api, prompt=LONG_PROMPT, path="server-only", link_id="prefill-warm-up", max_tokens=2)
    assert warm.status_code == 200, warm.text
    _set_link(admin_api, link, "2MB/s")
    poll(lambda p: p in ("server-only", "device-edge"), 30, "the large model serving at 2 MB/s")
    _set_link(admin_api, link, "2KB/s")
    moved = poll(lambda p: p == "on-device", 40, "fast requests moving on-device at 2 KB/s")
    assert "objective" in moved["reason"], moved["reason"]
    _set_link(admin_api, link, "2MB/s")
    back = poll(lambda p: p in ("server-only", "device-edge"), 40, "coming back at 2 MB/s")
    assert "meets" in back["reason"], back["reason"]


def test_saturated_edge_sheds_fast_requests_and_queues_exact_ones(api: httpx.Client) -> None:
    """Every edge slot taken: a fast request is answered on the device at once, an exact one waits in the
    edge's bounded queue and is answered by the large model (a refusal only past that queue, or past the
    client's stated timeout: unit-tested in tests/unit/test_routing.py, and drilled in tests/faults)."""
    statuses: list[int] = []

    def hold_the_edge() -> None:
        response = api.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 800, "path": "server-only",
                                                   "ignore_eos": True})
        statuses.append(response.status_code)

    def edge_saturated() -> bool:
        edge = api.get("/v1/router").json()["loads"]["edge"]
        return bool(edge["available"] and edge["ongoing"] + edge["queued"] >= edge["capacity"] > 0)

    # As many long requests as the edge has slots: each slot taken, and its queue empty (until the tier's
    # pace under saturation is measured, its queue holds one request a slot: tests/unit/test_routing.py).
    slots = api.get("/v1/router").json()["loads"]["edge"]["capacity"]
    holders = [threading.Thread(target=hold_the_edge) for _ in range(slots)]
    for thread in holders:
        thread.start()
    try:
        _poll(edge_saturated, 20, "the edge reporting saturation")
        # A client that says it waits 10 ms cannot be served behind the requests holding the slots: told at
        # once. (The tiny models answer 64 tokens in well under a second: a longer timeout might fit.)
        impatient = api.post("/v1/generate", headers={"X-Request-Timeout-S": "0.01"},
                             json={"prompt": PROMPT, "max_tokens": 64, "path": "auto", "quality": "exact"})
        assert impatient.status_code == 503 and int(impatient.headers["Retry-After"]) >= 1, impatient.text
        assert "s deadline" in impatient.json()["error"]["message"], impatient.text
        shed = _generate(api, path="auto", quality="fast")
        assert shed.status_code == 200 and shed.json()["trace"]["path"] == "on-device"
        assert "saturated" in shed.json()["route"]["reason"]
        queued = _generate(api, path="auto", quality="exact")
        assert queued.status_code == 200, queued.text
        assert queued.json()["trace"]["path"] in ("device-edge", "server-only")
        assert "queued behind" in queued.json()["route"]["reason"], queued.json()["route"]
    finally:
        for thread in holders:
            thread.join(timeout=120)
        _poll(lambda: not edge_saturated(), 20, "the edge draining")  # leave the cluster as found
    assert statuses == [200] * slots  # the requests that filled the edge were served, not dropped


def test_client_disconnect_cancels_the_generation(api: httpx.Client, admin_api: httpx.Client) -> None:
    from ray import serve

    device = serve.get_deployment_handle("DeviceDrafter", app_name="aiflow")
    before = device.stats.remote().result()["cancelled"]
    _set_link(admin_api, "cancel", "2KB/s")  # about 20 s for these 1000 tokens: far longer than the wait below
    body = {"prompt": PROMPT, "max_tokens": 1000, "path": "device-edge", "draft_len": 2, "stream": True,
            "link_id": "cancel"}
    with api.stream("POST", "/v1/generate", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # tokens are flowing; leaving the block drops the connection

    def stopped() -> bool:
        stats = device.stats.remote().result()
        return bool(stats["cancelled"] > before and stats["active"] == 0)

    _poll(stopped, 10, "the device stopping the abandoned generation")


def test_auth_rejects_a_missing_or_wrong_key(serve_url: str) -> None:
    body = {"prompt": PROMPT, "max_tokens": 4}
    missing = httpx.post(f"{serve_url}/v1/generate", json=body, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["param"] == "authorization"
    wrong = httpx.post(f"{serve_url}/v1/generate", json=body, timeout=30, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{serve_url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{serve_url}/healthz", timeout=30).status_code == 200  # probes stay open
    # The admin routes want the admin key: the API key is refused, the admin key also serves user routes.
    link = {"bandwidth": "2MB/s", "rtt_ms": 2}
    user = httpx.put(f"{serve_url}/v1/admin/links/auth", json=link, timeout=30,
                     headers={"Authorization": f"Bearer {API_KEY}"})
    assert user.status_code == 403 and user.json()["error"]["param"] == "authorization"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.put(f"{serve_url}/v1/admin/links/auth", json=link, timeout=30, headers=admin).status_code == 200
    assert httpx.get(f"{serve_url}/v1/models", timeout=30, headers=admin).status_code == 200


def test_submitted_ray_jobs_succeed_and_write_their_outputs(serve_url: str, cluster_info: dict[str, str],
                                                             tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": PROMPT}) + "\n" + "not json\n"
                       + json.dumps({"id": "b", "prompt": "def add(a, b):", "path": "on-device", "quality": "fast"})
                       + "\n")
    out = tmp_path / "eval" / "results.jsonl"
    sweep = tmp_path / "sweep"
    ray_cli = str(Path(sys.executable).parent / "ray")
    for entrypoint in (
        f"python -m aiflow_ray.jobs.batch_eval --url {serve_url} --input {prompts} --output {out} --max-tokens 8",
        f"python -m aiflow_ray.jobs.tpot_sweep --url {serve_url} --output {sweep} --prompts 2 --draft-lens 2 "
        "--bandwidths 2MB/s --max-tokens 8 --rtt-ms 2",
    ):
        command = [ray_cli, "job", "submit", "--address", cluster_info["dashboard"], "--", *entrypoint.split()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in (done.stdout + done.stderr).lower()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [("error" in r) for r in records] == [False, True, False]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["ok"] == 2 and summary["errors"] == 1 and summary["paths"].get("on-device") == 1
    rows = (sweep / "tpot_sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3  # header + 2 prompts x (server-only, k=2, adaptive)
    ratios = json.loads((sweep / "summary.json").read_text())["bandwidths"]["2MB/s"]
    assert ratios["server-only"]["ratio_vs_server_only"] == pytest.approx(1.0)
    assert ratios["k=2"]["median_tpot_s"] > 0


def test_adaptive_draft_length_changes_with_conditions(api: httpx.Client, admin_api: httpx.Client) -> None:
    def draft_lens(rtt_ms: float) -> list[int]:
        admin_api.put("/v1/admin/links/adaptive", json={"bandwidth": "2MB/s", "rtt_ms": rtt_ms}, timeout=10)
        lens: list[int] = []
        for _ in range(4):
            trace = _generate(api, path="device-edge", draft_len="auto", link_id="adaptive",
                              max_tokens=32).json()["trace"]
            lens = trace["draft_lens"][1:-1] or lens
        return lens

    short_rtt = draft_lens(1)
    long_rtt = draft_lens(400)  # a round trip now costs hundreds of tiny forwards: draft much longer
    assert sum(long_rtt) / len(long_rtt) > sum(short_rtt) / len(short_rtt)


def test_metrics_and_health(api: httpx.Client, serve_url: str) -> None:
    assert api.get("/healthz", timeout=10).json() == {"status": "ok"}
    assert httpx.get(f"{serve_url}/readyz", timeout=10).json() == {"status": "ready"}  # open, like /healthz
    text = api.get("/metrics", timeout=10).text
    # vLLM's names under this project's prefix, after the requests the module's other tests sent.
    for name in ("aiflow:requests_total", "aiflow:time_to_first_token_seconds_bucket",
                 "aiflow:request_time_per_output_token_seconds_bucket", "aiflow:inter_token_latency_seconds_bucket",
                 "aiflow:spec_decode_num_draft_tokens_total",
                 "aiflow:spec_decode_num_accepted_tokens_total", "aiflow:generation_tokens_total"):
        assert name in text, name
    # The router's view, refreshed at the scrape: each tier's slots and queue, and its link estimates.
    assert 'aiflow:num_requests_running{tier="edge"}' in text and 'aiflow:num_requests_waiting{tier="edge"}' in text
    assert "aiflow:link_bandwidth_bytes_per_second{" in text and "aiflow:router_acceptance_rate" in text


KB_DOCS = [
    {"source": "notes:raft", "title": "Raft",
     "text": "Raft is a consensus algorithm. Servers elect a leader by randomized election timeouts; the leader "
             "replicates its log to followers and commits an entry once a majority has stored it."},
    {"source": "notes:bloom", "title": "Bloom filter",
     "text": "A Bloom filter is a probabilistic set membership structure: k hash functions set bits in an "
             "array, lookups may return false positives but never false negatives."},
    {"source": "notes:tcp", "title": "TCP",
     "text": "TCP provides reliable ordered byte streams; lost segments are retransmitted after a timeout and "
             "congestion control adapts the sending window."},
]
QUESTION = "How does Raft choose a leader?"


def test_knowledge_base_ingest_search_and_grounded_answers(api: httpx.Client, admin_api: httpx.Client) -> None:
    before = api.get("/v1/kb").json()["chunks"]  # other tests of this cluster may have ingested before
    first = admin_api.post("/v1/admin/kb/documents", json={"documents": KB_DOCS})
    assert first.status_code == 200, first.text
    assert first.json()["added"] == 3 and first.json()["chunks"] == before + 3
    again = admin_api.post("/v1/admin/kb/documents", json={"documents": KB_DOCS}).json()
    assert again["unchanged"] == 3 and again["chunks"] == before + 3  # re-ingest does not duplicate

    def raft_first() -> list[dict] | None:
        hits = api.post("/v1/kb/search", json={"query": "leader election for consensus", "top_k": 2}).json()["hits"]
        return hits if hits and hits[0]["source"] == "notes:raft" else None

    hits = _poll(raft_first, 15, "the new documents becoming searchable")
    assert {"source", "chunk_id", "score", "text"} <= set(hits[0]) and hits[0]["chunk_id"] == "notes:raft#0"
    # Words only the TCP note contains find it.
    lexical = api.post("/v1/kb/search", json={"query": "segments retransmitted", "top_k": 1}).json()["hits"]
    assert lexical[0]["source"] == "notes:tcp"

    def grounded(**extra: object) -> dict:
        response = _generate(api, prompt=QUESTION, quality="grounded", retrieval_top_k=2, max_tokens=16, **extra)
        assert response.status_code == 200, response.text
        return response.json()

    beam = grounded(beam_width=3)
    trace = beam["trace"]
    assert trace["path"] == "device-edge-cloud" and beam["sources"][0]["source"] == "notes:raft"
    assert trace["retrieval"]["beam_width"] == 3 and trace["stages"]["search_s"] > 0
    for link in ("device-edge", "edge-cloud"):  # only the question goes up; the answer comes down
        assert trace["links"][link]["bytes_up"] == len(QUESTION) + 8 and trace["links"][link]["bytes_down"] > 0
    # Speculative decoding over the retrieved chunks equals the large model's greedy answer (beam width 1).
    greedy = grounded(beam_width=1)
    speculative = grounded(generation="speculative", draft_len=3)
    assert speculative["token_ids"] == greedy["token_ids"]
    assert speculative["trace"]["rounds"] >= 1 and speculative["trace"]["links"]["device-edge"]["bytes_down"] > 0
    # The query can travel as a device-computed embedding instead: 384 float16 values, searched densely
    # (no text for the lexical half), which still finds the passage here.
    embedded = grounded(beam_width=1, query_encoding="embedding")
    assert embedded["sources"][0]["source"] == "notes:raft" and embedded["token_ids"]
    assert embedded["trace"]["links"]["device-edge"]["bytes_up"] == 768 + 8


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/kb/search", {"query": "  "}, "query"),
        ("/v1/kb/search", {"query": "x", "top_k": 0}, "top_k"),
        ("/v1/admin/kb/documents", {"documents": []}, "documents"),
        ("/v1/admin/kb/documents", {"documents": [{"source": "a", "text": " "}]}, "documents.0.text"),
        ("/v1/admin/kb/documents", {"documents": [{"source": "a", "text": "t", "extra": 1}]}, "documents.0.extra"),
        ("/v1/generate", {"prompt": "x", "quality": "grounded", "retrieval_top_k": 0}, "retrieval_top_k"),
        ("/v1/generate", {"prompt": "x", "quality": "grounded", "generation": "magic"}, "generation"),
    ],
)
def test_knowledge_base_bad_input_gets_4xx_naming_the_field(api: httpx.Client, admin_api: httpx.Client, route: str,
                                                            body: dict, field: str) -> None:
    response = (admin_api if route.startswith("/v1/admin/") else api).post(route, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == field, response.text
