"""Images through the HTTP API (FastAPI's ASGI app in process) onto the real device and edge tier servers with
the tiny random InternVL pair: OpenAI image_url parts and native images, usage counting image tokens, model
cards with input modalities, and every bad image a 4xx naming its field, with the API healthy afterwards."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from aiflow_ray.api.app import Ingress, build_api
from aiflow_ray.config import AppArgs, LinkConfig, ModelPairConfig
from aiflow_ray.routing.messages import Routed, RouteRequest
from aiflow_ray.routing.policy import Decision
from aiflow_ray.serve.device_server import DeviceDrafterServer
from aiflow_ray.serve.edge_server import EdgeVerifierServer
from aiflow_ray.tiers.pipeline import Pipeline
from tests.unit.fakes import FakeHandle

FAST_LINK = LinkConfig(bandwidth_bps=1e9, rtt_s=0.0)
READY = {"loads": {"edge": {"available": True}, "cloud": {"available": True}}, "draft_s_per_token": 0.01}
VLM = ModelPairConfig(drafter="tiny-vlm-drafter", verifier="tiny-vlm-verifier", dtype="float32")


class Router:
    """Runs the path a request forces (device-edge for auto), so tests compare paths."""

    def __init__(self) -> None:
        self.requests: list[RouteRequest] = []

    async def snapshot(self) -> dict[str, Any]:
        return READY

    async def decide(self, req: RouteRequest) -> Routed:
        self.requests.append(req)
        return Routed(Decision("device-edge" if req.path == "auto" else req.path, 3, "test"), FAST_LINK)

    def report_generation(self, report: Any) -> None: ...

    def report_load(self, report: Any) -> None: ...

    def emulated_link(self, _link_id: str) -> None:
        return None


def data_url(image: Image.Image, fmt: str = "PNG", **save: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def picture(seed: int, size: tuple[int, int] = (120, 80)) -> Image.Image:
    small = (np.random.default_rng(seed).random((5, 7, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def png_bomb(side: int) -> bytes:
    """A 1-bit PNG of side x side pixels, a few hundred KB on the wire, built without allocating its pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\x00" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _client(args: dict[str, Any], device: Any) -> TestClient:
    ingress = Ingress(args, FakeHandle(device), FakeHandle(object()), FakeHandle(Router()))
    return TestClient(build_api(ingress.args, lambda: ingress), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def vlm() -> Pipeline:
    return Pipeline.load(VLM)


@pytest.fixture()
def client(vlm: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("AIFLOW_API_KEY", raising=False)
    monkeypatch.delenv("AIFLOW_ADMIN_KEY", raising=False)
    args = AppArgs(models=VLM, link_probe={"enabled": False}, link=FAST_LINK,  # type: ignore[arg-type]
                   kb={"path": str(tmp_path / "kb.sqlite")}).model_dump(mode="json")
    router = FakeHandle(Router())
    edge = EdgeVerifierServer(args, engine=vlm.verifier_engine, router=router, replica_id=lambda: "edge-1")
    device = DeviceDrafterServer(args, FakeHandle(edge), None, engine=vlm.drafter_engine, router=router)
    device.startup_chores()
    assert device.tokenizer_error is None and device.device.verifier_encoder_digest is not None
    yield _client(args, device)
    device.prober.stop()


def chat(url: str, text: str = "Describe the image.", **kw: Any) -> dict[str, Any]:
    return {"model": "tiny-vlm-verifier", "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": url}}]}], **kw}


def test_models_say_what_they_take(client: TestClient) -> None:
    cards = client.get("/v1/models").json()["data"]
    assert {c["id"] for c in cards} >= {"tiny-vlm-verifier", "tiny-vlm-drafter"}
    assert all(c["input_modalities"] == ["text", "image"] for c in cards)


def test_chat_with_an_image_is_exact_across_paths_and_counts_image_tokens(client: TestClient) -> None:
    url = data_url(picture(1))
    answer = client.post("/v1/chat/completions", json=chat(url))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    trace = body["aiflow_trace"]
    # auto: the fewer bytes of the lossless representations (a small PNG may beat its own tiles).
    assert trace["image_upload"] in ("raw", "resized") and 0 < trace["image_bytes_sent"] <= trace["image_bytes_raw"]
    text_only = client.post("/v1/chat/completions", json={
        "model": "tiny-vlm-verifier", "max_tokens": 4,
        "messages": [{"role": "user", "content": "Describe the image."}]})
    # 120 x 80 px at 56 px tiles: a 2 x 1 grid plus the thumbnail, 4 tokens a tile, and <img> </img> around them.
    assert body["usage"]["prompt_tokens"] - text_only.json()["usage"]["prompt_tokens"] >= 3 * 4 + 2
    native = {"prompt": "Describe the image.", "images": [url], "max_tokens": 12, "chat": True}
    outputs = set()
    for path in ("server-only", "device-edge"):
        for upload in ("raw", "resized"):
            reply = client.post("/v1/generate", json={**native, "path": path, "image_upload": upload})
            assert reply.status_code == 200, reply.text
            assert reply.json()["trace"]["image_upload"] == upload
            outputs.add(tuple(reply.json()["token_ids"]))
    assert len(outputs) == 1  # every path and lossless upload gives the verifier's greedy output


def test_different_images_are_different_prompts(client: TestClient) -> None:
    one = client.post("/v1/generate", json={"prompt": "x", "images": [data_url(picture(2))], "max_tokens": 10})
    two = client.post("/v1/generate", json={"prompt": "x", "images": [data_url(picture(3))], "max_tokens": 10})
    assert one.status_code == two.status_code == 200
    assert one.json()["token_ids"] != two.json()["token_ids"]


BAD_URLS: list[tuple[str, int]] = [
    ("data:image/png;base64,@@@not-base64@@@", 400),
    ("data:image/png;base64," + base64.b64encode(b"plain text, not an image").decode(), 400),
    ("data:image/png;base64," + base64.b64encode(png_bomb(30_000)).decode(), 413),
    ("data:image/gif;base64," + base64.b64encode(b"GIF89a" + bytes(40)).decode(), 415),
    ("https://example.com/cat.png", 400),
    ("file:///etc/passwd", 400),
]


@pytest.mark.parametrize(("url", "status"), BAD_URLS)
def test_bad_images_are_4xx_naming_the_part(client: TestClient, url: str, status: int) -> None:
    reply = client.post("/v1/chat/completions", json=chat(url))
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url", error
    assert "Traceback" not in error["message"]
    native = client.post("/v1/generate", json={"prompt": "x", "images": [url], "max_tokens": 4})
    assert native.status_code == status and native.json()["error"]["param"] == "images[0]", native.text
    assert client.post("/v1/chat/completions", json=chat(data_url(picture(4)))).status_code == 200  # still healthy


def test_malformed_image_requests_are_400s(client: TestClient) -> None:
    url = data_url(picture(5))
    too_many = {"prompt": "x", "images": [url] * 5, "max_tokens": 4}
    reply = client.post("/v1/generate", json=too_many)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "images[0]", reply.text
    assistant = {"model": "tiny-vlm-verifier", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    assert client.post("/v1/chat/completions", json=assistant).status_code == 400
    unknown = chat(url)
    unknown["messages"][0]["content"].append({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})
    reply = client.post("/v1/chat/completions", json=unknown)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages.0.content.2", reply.text
    injected = chat(url, text="<IMG_CONTEXT><IMG_CONTEXT> typed")
    reply = client.post("/v1/chat/completions", json=injected)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages", reply.text


def test_metadata_never_leaves_the_device(client: TestClient) -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCamera"  # Make
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}  # GPS IFD
    url = data_url(picture(6, (160, 120)), "JPEG", exif=exif.tobytes(), quality=90)
    reply = client.post("/v1/generate", json={"prompt": "x", "images": [url], "max_tokens": 4, "image_upload": "raw"})
    assert reply.status_code == 200, reply.text
    trace = reply.json()["trace"]
    assert trace["image_bytes_sent"] < trace["image_bytes_raw"]  # the EXIF block is gone


def test_a_text_only_pair_refuses_images_naming_the_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIFLOW_API_KEY", raising=False)
    monkeypatch.delenv("AIFLOW_ADMIN_KEY", raising=False)
    args = AppArgs(model_preset="tiny").model_dump(mode="json")
    client = _client(args, object())  # the device is never reached
    body = chat(data_url(picture(7)))
    body["model"] = "tiny-verifier"
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages[0].content[1].image_url"
    assert client.get("/v1/models").json()["data"][0]["input_modalities"] == ["text"]


class _ImageHost(http.server.BaseHTTPRequestHandler):
    """Serves the remote-image cases on 127.0.0.1: an image, redirects in and out of the allow-list, a 404, an
    oversized body without a length, and one that never finishes."""

    image = b""

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/cat.png":
            self._send(200, self.image, {"Content-Type": "image/png"})
        elif self.path == "/moved":
            self._send(302, b"", {"Location": "/cat.png"})
        elif self.path == "/away":
            self._send(302, b"", {"Location": f"http://localhost:{port}/cat.png"})
        elif self.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif self.path == "/huge":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the limit must be enforced while streaming
            with contextlib.suppress(OSError):
                for _ in range(64):
                    self.wfile.write(bytes(64 * 1024))
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            time.sleep(2.5)
        else:
            self._send(404, b"no such image", {})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None: ...


@pytest.fixture()
def image_host() -> Iterator[str]:
    buf = io.BytesIO()
    picture(8).save(buf, "PNG")
    _ImageHost.image = buf.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_allow_listed_image_urls_are_fetched_within_bounds(vlm: Pipeline, image_host: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIFLOW_API_KEY", raising=False)
    monkeypatch.delenv("AIFLOW_ADMIN_KEY", raising=False)
    images = {"allow_remote_urls": True, "url_allow_list": ["127.0.0.1"], "max_image_bytes": 1_000_000,
              "url_fetch_timeout_s": 1.0}
    args = AppArgs(models=VLM, link_probe={"enabled": False}, link=FAST_LINK, images=images,  # type: ignore[arg-type]
                   kb={"path": str(tmp_path / "kb.sqlite")}).model_dump(mode="json")
    router = FakeHandle(Router())
    edge = EdgeVerifierServer(args, engine=vlm.verifier_engine, router=router, replica_id=lambda: "edge-1")
    device = DeviceDrafterServer(args, FakeHandle(edge), None, engine=vlm.drafter_engine, router=router)
    device.startup_chores()
    try:
        client = _client(args, device)
        inline = client.post("/v1/generate", json={"prompt": "x", "images": [data_url(picture(8))],
                                                   "max_tokens": 8, "path": "server-only"})
        assert inline.status_code == 200, inline.text
        for path in ("/cat.png", "/moved"):
            reply = client.post("/v1/chat/completions", json=chat(image_host + path, max_tokens=8))
            assert reply.status_code == 200, reply.text
            assert reply.json()["aiflow_trace"]["image_bytes_raw"] == len(_ImageHost.image)
            native = client.post("/v1/generate", json={"prompt": "x", "images": [image_host + path],
                                                       "max_tokens": 8, "path": "server-only"})
            assert native.json()["token_ids"] == inline.json()["token_ids"]  # the same image, fetched
        started = time.monotonic()
        for path, status in (("/away", 400), ("/loop", 400), ("/missing", 400), ("/huge", 413), ("/slow", 400)):
            reply = client.post("/v1/chat/completions", json=chat(image_host + path))
            assert reply.status_code == status, (path, reply.text)
            assert reply.json()["error"]["param"] == "messages[0].content[1].image_url", reply.text
        assert time.monotonic() - started < 10  # the slow host is cut at url_fetch_timeout_s
        other = client.post("/v1/generate", json={"prompt": "x", "images": ["http://localhost/cat.png"],
                                                   "max_tokens": 4})
        assert other.status_code == 400 and "not allowed" in other.json()["error"]["message"], other.text
        assert client.post("/v1/chat/completions", json=chat(image_host + "/cat.png")).status_code == 200
    finally:
        device.prober.stop()
