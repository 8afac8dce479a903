"""OpenAI compatibility as real clients use it: the openai SDK, and the exact requests of guidellm."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import API_KEY
from tests.integration.test_serve_api import OVER_CONTEXT_PROMPT, assert_no_internals

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VERIFIER, DRAFTER = "tiny-verifier", "tiny-drafter"
PARTS = [{"type": "text", "text": "Say hello "}, {"type": "text", "text": "to the team."}]


@pytest.fixture(scope="module")
def client(serve_url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY, max_retries=0)


def test_content_parts_usage_and_the_newer_token_limit(client: Any) -> None:
    joined = client.chat.completions.create(model=VERIFIER, max_completion_tokens=10, temperature=0,
                                            messages=[{"role": "user", "content": "Say hello to the team."}])
    parts = client.chat.completions.create(model=VERIFIER, max_completion_tokens=10, temperature=0,
                                           messages=[{"role": "developer", "content": "Be brief."},
                                                     {"role": "user", "content": PARTS}])
    plain = client.chat.completions.create(model=VERIFIER, max_completion_tokens=10, temperature=0,
                                           messages=[{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Say hello to the team."}])
    # Parts are the same text as one string; 'developer' is the chat template's 'system'.
    assert parts.choices[0].message.content == plain.choices[0].message.content
    usage = parts.usage
    assert usage.completion_tokens == 10 and usage.prompt_tokens > joined.usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert parts.choices[0].finish_reason == "length"


def test_stream_with_include_usage_ends_with_the_usage_chunk(client: Any) -> None:
    chunks = list(client.chat.completions.create(
        model=VERIFIER, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": PARTS}]))
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 12 and last.usage.prompt_tokens > 0
    assert all(c.usage is None for c in content)
    assert content[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in content)
    whole = client.chat.completions.create(model=VERIFIER, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": PARTS}])
    assert text == whole.choices[0].message.content


def test_seed_makes_sampling_repeatable(client: Any, api: httpx.Client) -> None:
    def sample(seed: int) -> str:  # the drafter's name: on-device, one path for every call
        out = client.completions.create(model=DRAFTER, prompt="def f(x):", max_tokens=12, temperature=1.0, seed=seed)
        return str(out.choices[0].text)

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1  # the seed, not a fixed draw, decides

    def speculative(seed: int) -> list[int]:  # both ends of a sampled speculative run seed their draws
        body = {"prompt": "def f(x):", "max_tokens": 12, "temperature": 1.0, "seed": seed, "path": "device-edge",
                "draft_len": 3}
        out: list[int] = api.post("/v1/generate", json=body).json()["token_ids"]
        return out

    assert speculative(11) == speculative(11)


def test_chat_logprobs_are_the_verifiers_on_every_path(client: Any, api: httpx.Client) -> None:
    chat = client.chat.completions.create(model=VERIFIER, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=3, messages=[{"role": "user", "content": "Count: 1 2 3"}])
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens == 8
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # Greedy picks the argmax: the chosen token is the most likely alternative.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
    # The same numbers whether the verifier decoded alone or verified the device's drafts (fp32 tiny pair).
    native = {path: api.post("/v1/generate", json={"prompt": "Count: 1 2 3", "max_tokens": 8, "path": path,
                                                   "draft_len": 3, "logprobs": 2}).json()
              for path in ("server-only", "device-edge")}
    assert native["server-only"]["token_ids"] == native["device-edge"]["token_ids"]
    for a, b in zip(native["server-only"]["logprobs"], native["device-edge"]["logprobs"], strict=True):
        assert a["token"] == b["token"] and math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4)
    streamed = list(client.chat.completions.create(
        model=VERIFIER, max_tokens=8, temperature=0, logprobs=True, stream=True,
        messages=[{"role": "user", "content": "Count: 1 2 3"}]))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in entries]


def test_logprobs_where_no_verifier_runs_are_a_400_naming_the_field(client: Any, serve_url: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=DRAFTER, max_tokens=4, logprobs=True,
                                       messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["param"] == "logprobs"
    assert_no_internals(json.dumps(refused.value.body))
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model=VERIFIER, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"surprise": 1})
    assert unknown.value.body["param"] == "surprise"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=VERIFIER, max_tokens=4,
                                       messages=[{"role": "user", "content": OVER_CONTEXT_PROMPT}])
    assert too_long.value.body["param"] == "messages", too_long.value.body


def test_legacy_completions_logprobs(client: Any) -> None:
    out = client.completions.create(model=VERIFIER, prompt="def f(x):", max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset[0] == 0 and all(len(alts) == 2 for alts in lp.top_logprobs)


GUIDELLM = json.loads((Path(__file__).parent / "data" / "guidellm_0.8.1_requests.json").read_text())


def _name(r: dict[str, Any]) -> str:
    return f"{r['method']} {r['path']}{' stream' if (r['body'] or {}).get('stream') else ''}"


@pytest.mark.parametrize("request_", GUIDELLM["requests"], ids=_name)
def test_guidellm_requests_replayed_exactly(serve_url: str, request_: dict[str, Any]) -> None:
    """The bodies guidellm 0.8.1 sends, byte for byte, judged the way guidellm judges the answers."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = request_["body"]
    with httpx.Client(base_url=serve_url, headers=headers, timeout=120) as http:
        if request_["method"] == "GET":
            response = http.get(request_["path"])
            assert response.status_code == 200, response.text
            if request_["path"] == "/v1/models":
                assert response.json()["data"][0]["id"]
            return
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        if not body.get("stream"):
            response = http.post(request_["path"], json=body)
            assert response.status_code == 200, response.text
            out = response.json()
            choice = out["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            assert text or out["usage"]["completion_tokens"] > 0
            if body.get("ignore_eos"):
                assert out["usage"]["completion_tokens"] == wanted
            return
        usage, text = None, ""
        with http.stream("POST", request_["path"], json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                assert "error" not in event, event
                usage = event.get("usage") or usage
                for choice in event["choices"]:
                    text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        assert usage is not None and (text or usage["completion_tokens"] > 0)
        assert usage["prompt_tokens"] > 0
        if body.get("ignore_eos"):
            assert usage["completion_tokens"] == wanted
