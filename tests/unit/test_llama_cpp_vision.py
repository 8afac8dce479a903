"""llama.cpp's multimodal engine (libmtmd) against the HF reference on the same checkpoints: the tiny random
InternVL and Qwen2-VL, and the trained captioning verifier, converted to a GGUF and an mmproj by llama.cpp's own
converter (f32, so the engines differ only in kernels).

Only token ids cross the link, so an HF device and a llama.cpp edge must write an image prompt alike; the
llama.cpp edge must then caption as the HF model does, parting only at near-ties; and the speculative path with
an HF drafter and a llama.cpp verifier must give the llama.cpp verifier's own output. The engine's own
conformance (sessions, rollback, interleaved images): ``test_engine_conformance_images.py``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from aiflow_ray.config import GenerateOptions, LinkConfig, SamplingConfig
from aiflow_ray.config.generation import ImageSource
from aiflow_ray.engines.base import ImageInput
from aiflow_ray.engines.llama_cpp_vision import LlamaCppVisionEngine
from aiflow_ray.engines.loader import load_engine, resolve_model_path
from aiflow_ray.models.gguf_convert import ConverterMissing, convert_vision_checkpoint
from aiflow_ray.tiers.pipeline import Pipeline
from aiflow_ray.vision.preprocess import image_tiles
from tests.unit.test_engine_conformance_images import F32_TOLERANCE

PROMPT = "<image>\nDescribe the image."
GREEDY = SamplingConfig()
STEPS = 12


@pytest.fixture(scope="module", params=["tiny-vlm", "tiny-qwen-vl"])
def engines(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """(pair name, HF verifier, llama.cpp verifier): InternVL (tiles) and Qwen2-VL (whole image, M-RoPE)."""
    hf = load_engine(f"{request.param}-verifier", dtype="float32")
    cpp = load_engine(f"{request.param}-verifier", engine="llama_cpp", threads=2)
    assert isinstance(cpp, LlamaCppVisionEngine)
    return request.param, hf, cpp


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    small = (np.random.default_rng(seed).random((6, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _greedy(engine, ids: list[int], image: ImageInput, n: int = STEPS) -> list[int]:  # type: ignore[no-untyped-def]
    engine.open_session("g", ids, [image])
    out: list[int] = []
    try:
        for _ in range(n):
            token = engine.score("g", [], GREEDY).greedy_ids[0]
            out.append(token)
            engine.append("g", [token])
    finally:
        engine.release("g")
    return out


def test_an_hf_device_and_a_llama_cpp_edge_write_image_prompts_alike(engines) -> None:  # type: ignore[no-untyped-def]
    _, hf, cpp = engines
    assert cpp.vocab_fingerprint() == hf.vocab_fingerprint()
    assert cpp.vision.fingerprint() == hf.vision.fingerprint()
    sizes = [12, 30]
    text = "<image> and <image>: what differs? Code: `x = f(y)`"
    assert cpp.encode_image_prompt(text, True, sizes) == hf.encode_image_prompt(text, True, sizes)
    with pytest.raises(ValueError, match="image"):  # text spelling an image token never passes for an image
        cpp.encode_image_prompt(f"{cpp.BLOCK_TOKENS[1]} <image>", True, [12])


def test_llama_cpp_captions_as_the_hf_model_up_to_near_ties(engines) -> None:  # type: ignore[no-untyped-def]
    _, hf, cpp = engines
    for seed, size in ((1, (150, 90)), (2, (84, 196)), (3, (224, 224))):
        tiles = image_tiles(_photo(seed, size), hf.vision)
        image = ImageInput(tiles=tiles)
        ids = hf.encode_image_prompt(PROMPT, True, [hf.vision.tokens_for(tiles.shape)])
        want, got = _greedy(hf, ids, image), _greedy(cpp, ids, image)
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if first is not None:
            top2 = np.sort(hf.reference_logits([*ids, *want[:first]], [image])[-1].float().numpy())[-2:]
            assert top2[1] - top2[0] < F32_TOLERANCE, f"image {seed}: parted at token {first} without a near-tie"
        # Same checkpoint, same f32 weights: the distributions agree closely, the image included, from the
        # session (the engine's own positions) and from libmtmd's whole-prompt path alike.
        ref = hf.reference_logits([*ids, *want[:4]], [image])[-1].float().numpy()
        cpp.open_session("s", [*ids, *want[:4]], [image])
        try:
            session_row = cpp.score("s", [], GREEDY, with_logprobs=True).logprobs[0]
        finally:
            cpp.release("s")
        for mine in (session_row, cpp.reference_logits([*ids, *want[:4]], [image])[-1]):
            assert np.abs((ref - ref.max()) - (mine - mine.max())).max() < F32_TOLERANCE, f"image {seed}"


def test_an_hf_drafter_with_a_llama_cpp_verifier_gives_the_verifiers_output(engines) -> None:  # type: ignore[no-untyped-def]
    pair, _, cpp = engines
    drafter = load_engine(f"{pair}-drafter", dtype="float32")
    pipeline = Pipeline(drafter, cpp)
    buf = io.BytesIO()
    _photo(4, (160, 90)).save(buf, "PNG")
    data = buf.getvalue()
    tiles = image_tiles(Image.open(io.BytesIO(data)).convert("RGB"), cpp.vision)
    ids = cpp.encode_image_prompt(PROMPT, True, [cpp.vision.tokens_for(tiles.shape)])
    expected = pipeline.target_greedy(ids, 16, [ImageInput(tiles=tiles)])
    accepted = 0
    for path, upload in (("device-edge", "resized"), ("server-only", "raw"), ("device-edge", "raw")):
        options = GenerateOptions(prompt=PROMPT, images=(ImageSource(data=data, field="images[0]"),),
                                  max_new_tokens=16, link=LinkConfig(virtual_time=True),  # type: ignore[call-arg]
                                  path=path, draft_len=3, image_upload=upload)  # type: ignore[arg-type]
        result = pipeline.run(options)
        first = next((i for i, (a, b) in enumerate(zip(result.token_ids, expected, strict=False)) if a != b), None)
        if first is not None:  # llama.cpp's block and one-token evaluations may part at a near-tie only
            top2 = np.sort(cpp.reference_logits([*ids, *expected[:first]], [ImageInput(tiles=tiles)])[-1])[-2:]
            assert top2[1] - top2[0] < F32_TOLERANCE, (path, upload, first)
        else:
            assert result.token_ids == expected, (path, upload)
        accepted += sum(result.trace.accepted)
    assert accepted > 0


def test_an_evicted_image_session_is_decoded_again_exactly(engines) -> None:  # type: ignore[no-untyped-def]
    """Two KV sequences for three sessions with images: each round evicts the least recently used session, whose
    image block is decoded again from its kept embeddings when it comes back, at the same positions."""
    pair, hf, cpp = engines
    gguf, mmproj = convert_vision_checkpoint(resolve_model_path(f"{pair}-verifier"), outtype="f32",
                                             pre_tokenizer="qwen2")
    small = LlamaCppVisionEngine(gguf, mmproj, name="small-pool", vision=cpp.vision, threads=2, max_sequences=2)
    prompts = {}
    for key, (seed, size) in {"a": (5, (150, 90)), "b": (6, (84, 196)), "c": (7, (112, 112))}.items():
        tiles = image_tiles(_photo(seed, size), hf.vision)
        prompts[key] = (hf.encode_image_prompt(PROMPT, True, [hf.vision.tokens_for(tiles.shape)]),
                        ImageInput(tiles=tiles))
    alone = {key: _greedy(cpp, ids, image, 6) for key, (ids, image) in prompts.items()}
    together: dict[str, list[int]] = {key: [] for key in prompts}
    for key, (ids, image) in prompts.items():
        small.open_session(key, ids, [image])
    for _ in range(6):
        for key in prompts:
            token = small.score(key, [], GREEDY).greedy_ids[0]
            together[key].append(token)
            small.append(key, [token])
    assert together == alone


def test_a_home_without_the_converter_says_what_to_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A fresh AIFLOW_HOME has no converter until `make install` unpacks it: the error says so."""
    with pytest.raises(ConverterMissing, match="make install"):
        convert_vision_checkpoint(resolve_model_path("tiny-qwen-vl-verifier"), home=tmp_path)


@pytest.mark.real_model
@pytest.mark.slow
def test_the_trained_caption_verifier_captions_on_llama_cpp_as_on_hf() -> None:
    """The trained captioning pair, whose vision tower has learned class token, position embeddings and norms
    (a converter or graph that misplaces one of them still matches on a model left at transformers' constant
    initial values): on held-out scenes, llama.cpp's verifier writes the HF verifier's captions, and the HF
    drafter with the llama.cpp verifier gives the llama.cpp verifier's own caption."""
    from aiflow_ray.bench.captioning import scene_png
    from aiflow_ray.vision.scenes import make_split

    hf = load_engine("caption-verifier", dtype="float32")
    cpp = load_engine("caption-verifier", engine="llama_cpp", threads=2)
    pipeline = Pipeline(load_engine("caption-drafter", dtype="float32"), cpp)
    assert isinstance(cpp, LlamaCppVisionEngine)
    correct = 0
    for scene in make_split("test", 12, seed=11):
        image = ImageInput(tiles=image_tiles(scene.image.convert("RGB"), cpp.vision))
        ids = cpp.encode_image_prompt(PROMPT, True, [cpp.vision.tokens_for(image.tiles.shape)])  # type: ignore[union-attr]
        want, got = _greedy(hf, ids, image, 40), _greedy(cpp, ids, image, 40)
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if first is not None:
            top2 = np.sort(hf.reference_logits([*ids, *want[:first]], [image])[-1].float().numpy())[-2:]
            assert top2[1] - top2[0] < F32_TOLERANCE, f"{scene.caption!r}: parted at token {first} without a near-tie"
        options = GenerateOptions(prompt=PROMPT, images=(ImageSource(data=scene_png(scene.image), field="images[0]"),),
                                  max_new_tokens=40, link=LinkConfig(virtual_time=True),  # type: ignore[call-arg]
                                  path="device-edge", draft_len=4, image_upload="resized")  # type: ignore[arg-type]
        result = pipeline.run(options)
        end = next((i + 1 for i, t in enumerate(got) if t in cpp.eos_token_ids), len(got))
        assert result.token_ids == got[:end], scene.caption
        correct += result.text.strip() == scene.caption
    assert correct >= 10  # the verifier's held-out accuracy is about 96%
