"""The local profile's engines served: device and edge on llama.cpp (the real Q4_K_M GGUF pair) in the
same loopback cluster, as a second application beside the tiny one.

What only a cluster shows: the GGUF engines load and run inside Ray replicas, the device checks the
edge's GGUF tokenizer at start-up and reports ready, and every path answers. Exactness as llama.cpp's
arithmetic allows it (docs/design.md section 8): device-edge and server-only greedy outputs are equal,
or part only where the verifier's two best tokens lie within TIE_LOGITS of each other, read from the
server-only stream's own logprobs (one-token decodes, so its top-2 logprob gap is the logit gap).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aiflow_ray.serve.configs import serve_config
from tests.integration.conftest import API_KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.real_model]

APP = "aiflow-llama"
PREFIX = "/llama"
TIE_LOGITS = 1.0  # llama.cpp's block-vs-step noise on this pair, as in the engine conformance suite
PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "Explain in two sentences what a hash table is."]


def local_args() -> dict:  # type: ignore[type-arg]
    """The text application's arguments as `make run` deploys them."""
    args: dict = serve_config("local")["applications"][0]["args"]  # type: ignore[type-arg]
    return args


@pytest.fixture(scope="module")
def llama_api(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    from ray import serve

    from aiflow_ray.serve import build_app

    args = local_args()
    assert {args[tier]["engine"] for tier in ("device", "edge", "cloud")} == {"llama_cpp"}
    args["name"] = APP
    args["kb"] = {"path": str(tmp_path_factory.mktemp("llama-kb") / "kb.sqlite")}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    client = httpx.Client(base_url=f"{serve_url}{PREFIX}", headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=300)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            raise RuntimeError(f"the llama.cpp application never became ready: {client.get('/readyz').text}")
        yield client
    finally:
        client.close()
        serve.delete(APP)


def _generate(api: httpx.Client, prompt: str, path: str, **extra: object) -> dict:
    response = api.post("/v1/generate", json={"prompt": prompt, "path": path, "max_tokens": 16, **extra})
    assert response.status_code == 200, response.text
    body: dict = response.json()
    assert body["trace"]["path"] == path
    return body


@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculation_on_llama_cpp_tiers_matches_server_only_up_to_near_ties(llama_api: httpx.Client,
                                                                             prompt: str) -> None:
    alone = _generate(llama_api, prompt, "server-only", logprobs=2)
    spec = _generate(llama_api, prompt, "device-edge", draft_len=3)
    want, got = alone["token_ids"], spec["token_ids"]
    assert spec["trace"]["rounds"] < len(got)  # rounds accepted drafts: the drafter did its share
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
        top = sorted((alt["logprob"] for alt in alone["logprobs"][first]["top_logprobs"]), reverse=True)
        assert top[0] - top[1] < TIE_LOGITS, f"parted at token {first} without a near-tie ({top[0] - top[1]:.2f})"


def test_every_local_path_answers_on_llama_cpp(llama_api: httpx.Client) -> None:
    on_device = _generate(llama_api, PROMPTS[0], "on-device")
    assert len(on_device["token_ids"]) > 0 and on_device["text"]
    auto = llama_api.post("/v1/generate", json={"prompt": PROMPTS[1], "max_tokens": 8, "quality": "exact"})
    assert auto.status_code == 200, auto.text
    assert auto.json()["route"]["path"] in ("server-only", "device-edge")
    chat = llama_api.post("/v1/chat/completions", json={
        "model": "qwen2.5-coder-1.5b-instruct", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello."}]})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    # The cloud's beam search on llama.cpp sequences (its knowledge base is empty: the model says so).
    grounded = llama_api.post("/v1/generate", json={"prompt": "What is a monad?", "quality": "grounded",
                                                     "max_tokens": 8, "beam_width": 3})
    assert grounded.status_code == 200, grounded.text
    assert grounded.json()["trace"]["path"] == "device-edge-cloud" and grounded.json()["token_ids"]


def test_concurrent_requests_share_the_tiers_decodes(llama_api: httpx.Client) -> None:
    """Four clients at once, server-only: the llama.cpp edge scores their tokens in shared decodes (as
    llama-server's slots do); then four at once on device-edge: the device drafts for all of them side by side.
    Each answer is the one that client gets alone, or parts from it only at a near-tie (a shared decode's sums
    differ from a lone one's in the last bits)."""
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    prompts = [f"Write a Python function number {i} that {what}." for i, what in
               enumerate(("sorts a list", "reverses a string", "sums a dict's values", "counts vowels"))]
    alone = [_generate(llama_api, p, "server-only", logprobs=2) for p in prompts]
    edge = serve.get_deployment_handle("EdgeVerifier", app_name=APP)
    before = edge.stats.remote().result(timeout_s=30)
    assert before["engine"] == "BatchingLlamaCppEngine" and before["concurrent"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: _generate(llama_api, p, "server-only"), prompts))
        after = edge.stats.remote().result(timeout_s=30)
        speculated = list(pool.map(lambda p: _generate(llama_api, p, "device-edge", draft_len=3), prompts))
    scores, decodes = after["scores"] - before["scores"], after["decodes"] - before["decodes"]
    assert scores >= 1.5 * decodes, f"{scores} scores in {decodes} decodes: the streams did not share them"
    for solo, *others in zip(alone, together, speculated, strict=True):
        want = solo["token_ids"]
        for other in others:
            got = other["token_ids"]
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
                top = sorted((alt["logprob"] for alt in solo["logprobs"][first]["top_logprobs"]), reverse=True)
                assert top[0] - top[1] < TIE_LOGITS, f"parted at token {first} without a near-tie " \
                                                     f"({top[0] - top[1]:.2f})"


def test_the_forced_paths_load_script_reports_every_request(serve_url: str, llama_api: httpx.Client) -> None:
    """load_tests/forced_paths.py (how concurrency_default.md measured each change alone) against this app."""
    import re

    from load_tests import forced_paths

    line = forced_paths.run(f"{serve_url}{PREFIX}", 2, ["on-device", "server-only"], 1, 4, 120.0, API_KEY)
    match = re.match(r"2 streams on-device,server-only: (\d+) tokens in [\d.]+ s = [\d.]+ tokens/s; on-device \d+ "
                     r"ms a token, server-only \d+ ms a token; 0 failed$", line)
    assert match and int(match.group(1)) == 8, line


def test_the_profile_under_test_is_the_committed_one() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    committed = yaml.safe_load((root / "deployments" / "local.yaml").read_text())
    assert committed["applications"][0]["args"] == local_args()
