"""Images on the real local Ray cluster: the tiny random InternVL pair served as a second application beside
the text one (route prefix /vision), with the arguments `make run PROFILE=tiny` deploys, through real HTTP
and the openai client. Greedy output is the same on the
device-edge and server-only paths and for the raw and resized uploads; bad images are 4xx naming the part;
the application is removed afterwards so the other suites get their CPUs back."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aiflow_ray.config import AppArgs
from aiflow_ray.serve.configs import VISION_APP, VISION_PREFIX, vision_args
from tests.integration.conftest import API_KEY, wait_for_200

pytestmark = pytest.mark.integration

APP, PREFIX = VISION_APP, VISION_PREFIX


def data_url(seed: int, size: tuple[int, int] = (120, 80), fmt: str = "JPEG") -> str:
    small = (np.random.default_rng(seed).random((5, 7, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def vlm_url(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from aiflow_ray.serve import build_app

    args = vision_args("tiny")
    assert args is not None
    args["kb"] = {"path": str(tmp_path_factory.mktemp("vlm-kb") / "kb.sqlite")}
    serve.run(build_app(args), name=APP, route_prefix=PREFIX, blocking=False)
    url = f"{serve_url}{PREFIX}"
    try:
        wait_for_200(f"{url}/readyz", 240, "the vision application did not become ready")
        yield url
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def api(vlm_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vlm_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


def test_openai_client_captions_an_image(vlm_url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{vlm_url}/v1", api_key=API_KEY)
    cards = {m.id: m for m in client.models.list().data}
    assert "tiny-vlm-verifier" in cards
    assert cards["tiny-vlm-verifier"].model_extra["input_modalities"] == ["text", "image"]  # type: ignore[index]
    content = [{"type": "text", "text": "Describe the image."},
               {"type": "image_url", "image_url": {"url": data_url(1)}}]
    chat = client.chat.completions.create(model="tiny-vlm-verifier", max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": content}])  # type: ignore[misc]
    assert chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.prompt_tokens > 3 * 4  # the image's tokens are counted
    streamed = client.chat.completions.create(model="tiny-vlm-verifier", max_tokens=12, temperature=0, stream=True,
                                              messages=[{"role": "user", "content": content}])  # type: ignore[misc]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == chat.choices[0].message.content


def test_paths_and_lossless_uploads_agree_over_http(api: httpx.Client) -> None:
    url = data_url(2, (640, 480))
    outputs = {}
    for path in ("server-only", "device-edge"):
        for upload in ("raw", "resized"):
            reply = api.post("/v1/generate", json={"prompt": "Describe the image.", "images": [url], "max_tokens": 12,
                                                   "path": path, "image_upload": upload})
            assert reply.status_code == 200, reply.text
            trace = reply.json()["trace"]
            assert trace["image_upload"] == upload and trace["image_bytes_sent"] > 0
            outputs[(path, upload)] = reply.json()["token_ids"]
    assert len({tuple(v) for v in outputs.values()}) == 1, outputs


def test_bad_images_are_4xx_naming_the_part_and_the_api_stays_healthy(api: httpx.Client) -> None:
    cases = [("data:image/png;base64,AAAA", 400),
             ("data:image/gif;base64," + base64.b64encode(b"GIF89a" + bytes(64)).decode(), 415),
             ("https://example.com/x.png", 400)]
    for url, status in cases:
        body = {"model": "tiny-vlm-verifier", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]}
        reply = api.post("/v1/chat/completions", json=body)
        assert reply.status_code == status, reply.text
        assert reply.json()["error"]["param"] == "messages[0].content[1].image_url"
    good = api.post("/v1/generate", json={"prompt": "x", "images": [data_url(3)], "max_tokens": 4})
    assert good.status_code == 200, good.text


def test_a_camera_sized_photo_fits_the_body_limit(api: httpx.Client, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    noisy = (rng.random((3024, 4032, 3)) * 255).astype(np.uint8)  # noise: a worst case for JPEG
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=85)
    assert 5_000_000 < len(buf.getvalue()) < AppArgs().images.max_image_bytes
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    reply = api.post("/v1/generate", json={"prompt": "x", "images": [url], "max_tokens": 4, "path": "device-edge"})
    assert reply.status_code == 200, reply.text
    trace = reply.json()["trace"]
    assert trace["image_upload"] == "resized" and trace["image_bytes_sent"] * 10 < trace["image_bytes_raw"]


def test_the_text_application_says_where_the_vision_models_are(serve_url: str, vlm_url: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{serve_url}/v1", api_key=API_KEY)
    with pytest.raises(openai.NotFoundError, match=f"{PREFIX}/v1"):
        client.chat.completions.create(model="tiny-vlm-verifier", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])


CORRUPTIONS = st.sampled_from(["truncate", "flip", "garbage", "huge-header"])


@given(kind=CORRUPTIONS, cut=st.integers(min_value=1, max_value=2000), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_corrupted_images_are_4xx_naming_the_field(api: httpx.Client, kind: str, cut: int, seed: int) -> None:
    """Damaged images as a camera, a network or an attacker could send them: never a 5xx, always the field."""
    good = base64.b64decode(data_url(seed % 7, (160, 120)).split(",", 1)[1])
    rng = np.random.default_rng(seed)
    if kind == "truncate":
        bad = good[: max(4, len(good) - cut)]
    elif kind == "flip":
        arr = bytearray(good)
        for pos in rng.integers(2, len(arr), size=1 + cut % 16):
            arr[int(pos)] ^= 0xFF
        bad = bytes(arr)
    elif kind == "garbage":
        bad = b"\xff\xd8\xff" + rng.bytes(cut)
    else:  # a PNG header claiming 60000 x 60000 pixels
        bad = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (60000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
               + rng.bytes(cut))
    url = "data:image/jpeg;base64," + base64.b64encode(bad).decode()
    content = [{"type": "text", "text": "Describe."}, {"type": "image_url", "image_url": {"url": url}}]
    reply = api.post("/v1/chat/completions", json={"model": "tiny-vlm-verifier", "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": content}]})
    # A flipped byte inside JPEG entropy data still decodes: a 200 is a correct answer then.
    assert reply.status_code in (200, 400, 413, 415), reply.text[:300]
    if reply.status_code != 200:
        assert reply.json()["error"]["param"] == "messages[0].content[1].image_url", reply.text[:300]


def test_schemathesis_fuzzes_the_vision_application(vlm_url: str) -> None:
    """The served schema's image parts, valid and invalid, against the application that takes them."""
    from tests.integration.test_fuzz import _fuzz

    schema = schemathesis.openapi.from_url(f"{vlm_url}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    image_routes = [op for op in operations if op.path in ("/v1/chat/completions", "/v1/generate")]
    assert len(image_routes) == 2, [op.path for op in operations]
    _fuzz(image_routes, {"Authorization": f"Bearer {API_KEY}"}, examples=40)


@pytest.mark.extended
@pytest.mark.parametrize("preset", ["tiny-vlm", "tiny-qwen-vl"])
def test_a_llama_cpp_edge_serves_images_over_http(serve_url: str, tmp_path: Path, preset: str) -> None:
    """The tiny InternVL and Qwen2-VL pairs with the edge on llama.cpp (libmtmd, the checkpoint converted at
    deploy): an HF device drafts against it, and every path and lossless upload gives one caption."""
    from ray import serve

    from aiflow_ray.serve import build_app

    args = vision_args("tiny")
    assert args is not None
    args.update(name="aiflow-vision-llama", model_preset=preset, kb={"path": str(tmp_path / "kb.sqlite")})
    args["edge"]["engine"] = "llama_cpp"
    serve.run(build_app(args), name="aiflow-vision-llama", route_prefix="/vision-llama", blocking=False)
    url = f"{serve_url}/vision-llama"
    try:
        wait_for_200(f"{url}/readyz", 240, "the llama.cpp vision application did not become ready")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
            outputs = {}
            for path, upload in (("server-only", "raw"), ("device-edge", "resized"), ("device-edge", "raw")):
                reply = client.post("/v1/generate", json={"prompt": "Describe the image.", "images": [data_url(5)],
                                                          "max_tokens": 12, "path": path, "image_upload": upload})
                assert reply.status_code == 200, reply.text
                outputs[(path, upload)] = reply.json()["token_ids"]
        assert len({tuple(v) for v in outputs.values()}) == 1, outputs
        edge = serve.get_deployment_handle("EdgeVerifier", app_name="aiflow-vision-llama")
        assert edge.stats.remote().result(timeout_s=30)["engine"] == "LlamaCppVisionEngine"
    finally:
        serve.delete("aiflow-vision-llama")
