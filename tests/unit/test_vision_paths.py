"""Images through every path on the tiny random InternVL and Qwen2-VL pairs (fp32; Qwen2-VL with its 3-D
M-RoPE positions and whole-image resizing): greedy speculative output equals the
verifier's own output on the image, whatever the upload representation that is lossless; the image crosses
the link once per edge session; the edge refuses image payloads and prompts that do not match."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from aiflow_ray.config import GenerateOptions, LinkConfig, ModelPairConfig
from aiflow_ray.config.generation import ImageSource
from aiflow_ray.engines.base import ImageInput
from aiflow_ray.errors import RefusedError
from aiflow_ray.network import wire
from aiflow_ray.network.link import DuplexLink
from aiflow_ray.tiers.device import InProcessTransport
from aiflow_ray.tiers.images import prepare_image, receive_image
from aiflow_ray.tiers.paths import DeviceSide, run_path
from aiflow_ray.tiers.pipeline import Pipeline
from aiflow_ray.vision.decode import ImageLimits
from aiflow_ray.vision.preprocess import image_tiles

VIRTUAL_LINK = LinkConfig(virtual_time=True)  # type: ignore[call-arg]
MAX_NEW = 24
PROMPT = "<image>\nDescribe the image."


def photo(seed: int, size: tuple[int, int] = (160, 90), fmt: str = "PNG") -> bytes:
    """A smooth random picture (so JPEG and PNG both stay small), encoded."""
    rng = np.random.default_rng(seed)
    small = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module", params=["tiny-vlm", "tiny-qwen-vl"])
def vlm(request: pytest.FixtureRequest) -> Pipeline:
    pair = ModelPairConfig(drafter=f"{request.param}-drafter", verifier=f"{request.param}-verifier", dtype="float32")
    return Pipeline.load(pair)


def reference(vlm: Pipeline, data: bytes) -> list[int]:
    """The verifier alone on the image, preprocessed from the client's bytes at the edge."""
    engine = vlm.verifier_engine
    assert engine.vision is not None
    tiles = image_tiles(Image.open(io.BytesIO(data)).convert("RGB"), engine.vision)
    ids = engine.encode_image_prompt(PROMPT, True, [engine.vision.tokens_for(tiles.shape)])  # type: ignore[attr-defined]
    return vlm.target_greedy(ids, MAX_NEW, [ImageInput(tiles=tiles)])


def options(data: bytes, **kw: object) -> GenerateOptions:
    return GenerateOptions(prompt=PROMPT, images=(ImageSource(data=data, field="images[0]"),), max_new_tokens=MAX_NEW,
                           link=VIRTUAL_LINK, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("k", "upload"), [(1, "raw"), (4, "resized"), (3, "auto")])
def test_speculative_and_server_only_equal_the_verifier_on_the_image(vlm: Pipeline, upload: str, k: int) -> None:
    accepted = 0
    for seed in range(3):
        data = photo(seed)
        expected = reference(vlm, data)
        for path in ("device-edge", "server-only"):
            result = vlm.run(options(data, path=path, draft_len=k, image_upload=upload))
            assert result.token_ids == expected, (path, upload, k, seed)
            assert result.trace.image_bytes_raw == len(data)
            assert result.trace.image_upload == ("resized" if upload == "auto" else upload)
            accepted += sum(result.trace.accepted)
    assert accepted > 0  # the nested drafter is accepted sometimes, so acceptance is exercised


def test_different_images_give_different_captions(vlm: Pipeline) -> None:
    assert reference(vlm, photo(1)) != reference(vlm, photo(2))


def test_resized_sends_fewer_bytes_than_a_camera_photo_and_the_same_output(vlm: Pipeline) -> None:
    data = photo(5, size=(4032, 3024), fmt="JPEG")
    raw = vlm.run(options(data, path="device-edge", image_upload="raw"))
    resized = vlm.run(options(data, path="device-edge", image_upload="resized"))
    assert resized.token_ids == raw.token_ids
    assert resized.trace.image_bytes_sent * 5 <= raw.trace.image_bytes_sent  # 7-50x on these pairs
    assert raw.trace.image_bytes_sent <= len(data)  # metadata removed, nothing added


def test_the_edge_decodes_a_raw_photo_into_the_tiles_the_device_drafts_on(vlm: Pipeline) -> None:
    """A camera JPEG is decoded at reduced scale on both sides of the link, with the orientation the device
    read from the EXIF it removed: the edge's tiles are the device's, bit for bit, and the tiling is the one
    the photo's own size gives."""
    spec = vlm.verifier_engine.vision
    assert spec is not None
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(io.BytesIO(photo(6, size=(4032, 3024), fmt="JPEG"))).save(rotated, "JPEG", quality=90, exif=exif)
    prepared = prepare_image(rotated.getvalue(), "images[0]", "raw", spec, ImageLimits())
    assert prepared.payload.orientation == 6
    received = receive_image(prepared.payload, spec, ImageLimits())
    assert received.tiles is not None and np.array_equal(received.tiles, prepared.tiles)
    assert spec.tokens_for(prepared.tiles.shape) == spec.num_tokens(3024, 4032)  # portrait, as shown


def test_features_need_a_shared_encoder_and_then_cross_once(vlm: Pipeline) -> None:
    data = photo(3)
    if vlm.verifier_engine.encoder_digest is None:  # type: ignore[attr-defined]
        # Qwen2-VL's merger sits inside its vision tower: pixels only, and a request for features is a 400.
        with pytest.raises(RefusedError) as info:
            vlm.run(options(data, path="device-edge", image_upload="features"))
        assert info.value.refusal.status == 400 and info.value.refusal.field == "images[0]"
    else:
        result = vlm.run(options(data, path="device-edge", image_upload="features"))
        assert result.trace.image_upload == "features"
        assert len(result.token_ids) > 0
    # The tiny pair shares its encoder: int8 features change embeddings by < 1% and the caption rarely.
    jpeg = vlm.run(options(data, path="device-edge", image_upload="jpeg"))
    assert jpeg.trace.image_upload == "jpeg" and jpeg.trace.image_bytes_sent > 0


def test_the_image_crosses_once_per_edge_session_and_again_after_a_lost_session(vlm: Pipeline) -> None:
    data = photo(4)
    expected = reference(vlm, data)
    edge = vlm.edge
    original = edge.verify
    calls = {"n": 0}

    def forgetful(req: wire.VerifyRequest) -> wire.VerifyResult:
        calls["n"] += 1
        if calls["n"] == 3:  # the replica restarts between rounds: it lost the session and the image
            edge.drop_all_sessions()
        return original(req)

    edge.verify = forgetful  # type: ignore[method-assign]
    try:
        opts = options(data, path="device-edge", draft_len=2, image_upload="resized")
        link = DuplexLink.from_config(opts.link)
        device = DeviceSide(vlm.device)
        result = run_path(opts, device, InProcessTransport(edge, link))
    finally:
        edge.verify = original  # type: ignore[method-assign]
    assert result.token_ids == expected
    assert result.trace.context_resends == 1
    once = prepare_image(data, "images[0]", "resized", vlm.verifier_engine.vision, ImageLimits()).sent_bytes  # type: ignore[arg-type]
    assert result.trace.image_bytes_sent == 2 * once


def test_on_device_reads_the_image_with_the_small_model(vlm: Pipeline) -> None:
    data = photo(6)
    result = vlm.run(options(data, path="on-device"))
    assert result.trace.bytes_up == 0 and result.trace.image_bytes_sent == 0
    drafter = vlm.drafter_engine
    assert drafter.vision is not None
    tiles = image_tiles(Image.open(io.BytesIO(data)).convert("RGB"), drafter.vision)
    ids = drafter.encode_image_prompt(PROMPT, True, [drafter.vision.tokens_for(tiles.shape)])  # type: ignore[attr-defined]
    assert result.token_ids == Pipeline(drafter, drafter).target_greedy(ids, MAX_NEW, [ImageInput(tiles=tiles)])


@pytest.mark.parametrize("prompt", ["<image>\n<image>\nTwo placeholders, one image.", "{context} spelt out"])
def test_prompts_that_do_not_match_their_images_are_400s_naming_the_prompt(vlm: Pipeline, prompt: str) -> None:
    prompt = prompt.format(context=vlm.verifier_engine.BLOCK_TOKENS[1])  # type: ignore[attr-defined]
    opts = GenerateOptions(prompt=prompt, images=(ImageSource(data=photo(0), field="images[0]"),), link=VIRTUAL_LINK)
    with pytest.raises(RefusedError) as info:
        vlm.run(opts)
    assert info.value.refusal.status == 400 and info.value.refusal.field == "prompt"


def test_image_tokens_typed_in_a_text_prompt_are_refused(vlm: Pipeline) -> None:
    start, context, end = vlm.verifier_engine.BLOCK_TOKENS  # type: ignore[attr-defined]
    opts = GenerateOptions(prompt=f"{start}{context}{end} no image attached", link=VIRTUAL_LINK)
    with pytest.raises(RefusedError) as info:
        vlm.run(opts)
    assert info.value.refusal.status == 400 and info.value.refusal.field == "prompt"


def test_a_text_only_pair_refuses_images_naming_the_field(tiny_pipeline: Pipeline) -> None:
    opts = GenerateOptions(prompt="Describe.", images=(ImageSource(data=photo(0), field="images[0]"),),
                           link=VIRTUAL_LINK)
    with pytest.raises(RefusedError) as info:
        tiny_pipeline.run(opts)
    assert info.value.refusal.status == 400 and info.value.refusal.field == "images[0]"


def test_bad_image_bytes_are_refused_on_the_device_naming_the_field(vlm: Pipeline) -> None:
    opts = GenerateOptions(prompt=PROMPT, images=(ImageSource(data=b"not an image at all", field="images[0]"),),
                           link=VIRTUAL_LINK)
    with pytest.raises(RefusedError) as info:
        vlm.run(opts)
    assert info.value.refusal.status in (400, 415) and info.value.refusal.field == "images[0]"


def test_the_wire_carries_images_with_the_context_only() -> None:
    header = wire.Header(wire.MsgType.VERIFY, bytes(16), 1)
    payloads = (wire.ImagePayload(wire.ImageEncoding.TILES_PNG, b"\x89PNG..."),
                wire.ImagePayload(wire.ImageEncoding.RAW, b"\xff\xd8\xff", 6))
    req = wire.VerifyRequest(header, 3, np.asarray([1, 2], np.int32), np.asarray([5, 6, 7], np.int32),
                             images=payloads)
    back = wire.decode(wire.encode_verify(req))
    assert isinstance(back, wire.VerifyRequest) and back.images == payloads
    gen = wire.GenerateRequest(wire.Header(wire.MsgType.GENERATE, bytes(16), 0), np.asarray([1], np.int32), 4, None,
                               images=payloads)
    back_gen = wire.decode(wire.encode_generate(gen))
    assert isinstance(back_gen, wire.GenerateRequest) and back_gen.images == payloads
    bad = bytearray(wire.encode_verify(req))
    bad[-(8 + 3 + 6)] = 9  # the second image's encoding byte (before its 3 bytes and the 2-token draft): unknown
    with pytest.raises(wire.WireError):
        wire.decode(bytes(bad))


def test_the_edge_refuses_payloads_that_do_not_fit_its_tiles(vlm: Pipeline) -> None:
    spec = vlm.verifier_engine.vision
    assert spec is not None
    wrong = io.BytesIO()
    Image.new("RGB", (spec.tile_size + 1, spec.tile_size)).save(wrong, "PNG")
    with pytest.raises(wire.WireError):
        receive_image(wire.ImagePayload(wire.ImageEncoding.TILES_PNG, wrong.getvalue()), spec, ImageLimits())
    with pytest.raises(wire.WireError):
        receive_image(wire.ImagePayload(wire.ImageEncoding.FEATURES, b"\x00" * 40), spec, ImageLimits(), "00" * 8)
    # An edge asked to verify a context whose image blocks its images do not fill answers an error, not a 500.
    header = wire.Header(wire.MsgType.VERIFY, bytes(range(16)), 0)
    ids = vlm.verifier_engine.encode_prompt("no image here", True)
    req = wire.VerifyRequest(header, len(ids), np.asarray([], np.int32), np.asarray(ids, np.int32),
                             images=(wire.ImagePayload(wire.ImageEncoding.RAW, photo(0)),))
    reply = wire.decode(vlm.edge.handle(wire.encode_verify(req)))
    assert isinstance(reply, wire.ErrorMsg) and reply.code == 400


def test_sampled_output_follows_the_verifiers_distribution_on_the_image(vlm: Pipeline) -> None:
    """The first sampled token over many seeds: its frequencies match the verifier's distribution given this
    image (total variation within sampling noise), and not its distribution given another image."""
    from aiflow_ray.config import SamplingConfig

    sampling = SamplingConfig(temperature=1.0, top_k=4)
    engine = vlm.verifier_engine
    assert engine.vision is not None

    def target(data: bytes) -> np.ndarray:
        tiles = image_tiles(Image.open(io.BytesIO(data)).convert("RGB"), engine.vision)  # type: ignore[arg-type]
        ids = engine.encode_image_prompt(PROMPT, True, [engine.vision.tokens_for(tiles.shape)])  # type: ignore[attr-defined,union-attr]
        engine.open_session("p", ids, [ImageInput(tiles=tiles)])
        try:
            probs = engine.score("p", [], sampling).probs
        finally:
            engine.release("p")
        assert probs is not None
        return probs[0]

    data = photo(8)
    p_image, p_other = target(data), target(photo(9))
    runs = 400
    counts = np.zeros_like(p_image)
    for seed in range(runs):
        opts = GenerateOptions(prompt=PROMPT, images=(ImageSource(data=data, field="images[0]"),), max_new_tokens=1,
                               draft_len=2, link=VIRTUAL_LINK, sampling=SamplingConfig(temperature=1.0, top_k=4,
                                                                                       seed=seed))
        counts[vlm.run(opts).token_ids[0]] += 1
    freq = counts / runs
    tv_image = 0.5 * np.abs(freq - p_image).sum()
    tv_other = 0.5 * np.abs(freq - p_other).sum()
    assert tv_image < 0.08, (tv_image, np.nonzero(p_image)[0], freq[np.nonzero(p_image)[0]])
    assert tv_other > tv_image + 0.1  # the control: the image conditions what is sampled


def test_auto_upload_takes_the_representation_predicted_fastest() -> None:
    """A camera-sized photo: at the served pair's small tiles ``resized`` wins at any bandwidth; at InternVL's
    released tiling (13 tiles of 448 px, more PNG bytes than the photo's JPEG) ``raw`` wins on a slow link. The
    choice is always the lowest of the predictions it weighed."""
    from skimage import data as samples

    from aiflow_ray.bench.captioning import INTERNVL_RELEASED

    buf = io.BytesIO()
    Image.fromarray(samples.astronaut()).resize((2016, 1512), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=92)
    camera = buf.getvalue()
    small = INTERNVL_RELEASED.__class__(**{**INTERNVL_RELEASED.__dict__, "tile_size": 56, "tokens_per_tile": 4,
                                           "max_tiles": 6})
    limits = ImageLimits()
    chosen = {}
    for name, spec in (("small", small), ("released", INTERNVL_RELEASED)):
        for bandwidth_bps in (500e3, 1e9):
            image = prepare_image(camera, "images[0]", "auto", spec, limits, bandwidth_bps)
            assert set(image.predicted_s) == {"raw", "resized"}
            assert image.mode == min(image.predicted_s, key=image.predicted_s.__getitem__)
            chosen[name, bandwidth_bps] = image.mode, image.sent_bytes
    assert chosen["small", 500e3][0] == chosen["small", 1e9][0] == "resized"
    assert chosen["small", 500e3][1] * 5 < len(camera), chosen
    assert chosen["released", 500e3][0] == "raw", chosen
    lossy = prepare_image(camera, "images[0]", "auto", small, limits, 500e3, lossy_ok=True)
    assert set(lossy.predicted_s) == {"raw", "resized", "jpeg"} and lossy.mode == "jpeg"
