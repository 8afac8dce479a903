"""The engine conformance suite's image cases, on tiny random models of the classes released vision-language
checkpoints use, built at test time: InternVL (``InternVLForConditionalGeneration``), Qwen2-VL
(``Qwen2VLForConditionalGeneration``, 3-D M-RoPE positions) and Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``,
window attention in its vision tower). fp32, so every comparison is equality.

A session holding an image must score as the model's own forward from pixels does (no session, no cache),
one token at a time and a whole draft at once; a rollback to any point after the image must score as a fresh
session; sessions with different images must not disturb each other (Qwen2-VL's model keeps position state of
the last prompt it saw, which a shared engine must never read). Text-only engines refuse images:
``test_engine_conformance.test_text_only_engines_refuse_images``.

llama.cpp (``tiny-vlm-llama_cpp`` and ``tiny-qwen-vl-llama_cpp``: the tiny InternVL and Qwen2-VL converted by
llama.cpp's converter, served through libmtmd) is held to the same cases against its own reference: libmtmd's
whole-prompt path as llama.cpp's CLI runs it (Qwen2-VL), libmtmd's encode-and-decode a tile at a time (InternVL,
whose mmproj takes one tile an image). Its block and one-token evaluations are not bit-identical (f32 kernels of
other shapes: logits within 0.02 of each other), so its logits must match the reference's within
``F32_TOLERANCE`` and two greedy sequences may part only where the top two logits lie that close; across
engines: ``test_llama_cpp_vision.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aiflow_ray.config import SamplingConfig
from aiflow_ray.engines.base import ImageInput
from aiflow_ray.engines.hf_qwen_vl import HFQwenVLEngine
from aiflow_ray.engines.llama_cpp_vision import LlamaCppVisionEngine
from aiflow_ray.engines.loader import load_engine, resolve_model_path
from aiflow_ray.vision.preprocess import image_tiles

GREEDY = SamplingConfig()
PROMPT = "<image>\nDescribe the image."
# llama.cpp's f32 kernels against themselves at other batch shapes (and against torch's f32): logits differ by at
# most about 0.012 on these models, while a wrong position (an M-RoPE offset off) moves them by 4 or more.
F32_TOLERANCE = 0.05


@pytest.fixture(scope="module", params=["tiny-vlm", "tiny-qwen-vl", "tiny-qwen2.5-vl", "tiny-vlm-llama_cpp",
                                                "tiny-qwen-vl-llama_cpp"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if request.param.endswith("-llama_cpp"):
        return load_engine(request.param.replace("-llama_cpp", "-verifier"), engine="llama_cpp", threads=2)
    if request.param == "tiny-qwen2.5-vl":
        return load_engine(str(_tiny_qwen25_vl(tmp_path_factory.mktemp("qwen25vl"))), dtype="float32")
    return load_engine(f"{request.param}-verifier", dtype="float32")


def _tiny_qwen25_vl(out: Path) -> Path:
    """A random Qwen2.5-VL on the tiny Qwen2-VL pair's tokenizer and image tokens (seeded)."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    source = Path(str(resolve_model_path("tiny-qwen-vl-verifier")))
    tokenizer = AutoTokenizer.from_pretrained(source)
    known = json.loads((source / "config.json").read_text())
    eos = tokenizer.eos_token_id
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 8192,
            "initializer_range": 0.25, "eos_token_id": eos, "bos_token_id": eos, "pad_token_id": eos,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    # Two vision blocks: one windowed (56 px windows), one full attention, as the released towers alternate.
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
              "fullatt_block_indexes": [1], "initializer_range": 0.25}
    tokens = {k: known[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                    "vision_end_token_id")}
    torch.manual_seed(2525)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                                tie_word_embeddings=True, **tokens))
    model.float().eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text((source / "preprocessor_config.json").read_text())
    return out


def _image(engine, seed: int, size: tuple[int, int]) -> tuple[list[int], ImageInput]:  # type: ignore[no-untyped-def]
    small = (np.random.default_rng(seed).random((5, 7, 3)) * 255).astype(np.uint8)
    tiles = image_tiles(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC), engine.vision)
    ids = engine.encode_image_prompt(PROMPT, True, [engine.vision.tokens_for(tiles.shape)])
    return ids, ImageInput(tiles=tiles)


def _exact(engine) -> bool:  # type: ignore[no-untyped-def]
    return not isinstance(engine, LlamaCppVisionEngine)


def _assert_same_or_near_tie(engine, ids: list[int], image: ImageInput, got: list[int],  # type: ignore[no-untyped-def]
                             want: list[int]) -> None:
    if _exact(engine):
        assert got == want
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    if first is not None:
        top2 = np.sort(engine.reference_logits([*ids, *want[:first]], [image])[-1])[-2:]
        assert top2[1] - top2[0] < F32_TOLERANCE, f"parted at token {first} without a near-tie"


def _log_softmax(row: np.ndarray) -> np.ndarray:
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def _reference_greedy(engine, ids: list[int], image: ImageInput, n: int) -> list[int]:  # type: ignore[no-untyped-def]
    seq, out = list(ids), []
    for _ in range(n):
        token = int(engine.reference_logits(seq, [image])[-1].argmax())
        out.append(token)
        seq.append(token)
    return out


def test_a_session_on_an_image_decodes_as_the_models_own_forward(engine) -> None:  # type: ignore[no-untyped-def]
    ids, image = _image(engine, 1, (150, 90))
    reference = _reference_greedy(engine, ids, image, 8)
    engine.open_session("one", ids, [image])
    try:
        steps = []
        for step in range(8):
            out = engine.score("one", [], GREEDY, with_logprobs=not _exact(engine))
            token = out.greedy_ids[0]
            if not _exact(engine):  # the distribution itself, not only its argmax, as the reference's
                want = _log_softmax(np.asarray(engine.reference_logits([*ids, *steps], [image])[-1], np.float64))
                np.testing.assert_allclose(out.logprobs[0], want, atol=F32_TOLERANCE, err_msg=f"step {step}")
            steps.append(token)
            engine.append("one", [token])
        if isinstance(engine, HFQwenVLEngine):
            # Qwen2-VL class: the decode steps past the image took their M-RoPE positions from the session's
            # offset (the equality above checks them against the model's own forward).
            assert engine._sessions["one"].text_position_offset is not None
    finally:
        engine.release("one")
    _assert_same_or_near_tie(engine, ids, image, steps, reference)
    engine.open_session("block", ids, [image])
    try:
        block = engine.score("block", reference[:7], GREEDY).greedy_ids
    finally:
        engine.release("block")
    assert block is not None
    _assert_same_or_near_tie(engine, ids, image, block, reference[:8])  # all eight choices from one forward


def test_rollback_after_the_image_scores_as_a_fresh_session(engine) -> None:  # type: ignore[no-untyped-def]
    ids, image = _image(engine, 2, (80, 120))
    engine.open_session("r", ids, [image])
    engine.open_session("fresh", [*ids, 11, 12], [image])
    try:
        engine.score("r", [21, 22, 23], GREEDY)
        engine.append("r", [5, 6, 7])
        engine.rollback("r", len(ids))
        engine.append("r", [11, 12])
        again = engine.score("r", [31, 32], GREEDY, with_logprobs=True)
        fresh = engine.score("fresh", [31, 32], GREEDY, with_logprobs=True)
    finally:
        engine.release("r")
        engine.release("fresh")
    assert again.greedy_ids == fresh.greedy_ids
    assert again.logprobs is not None and fresh.logprobs is not None
    np.testing.assert_allclose(again.logprobs, fresh.logprobs, atol=1e-4 if _exact(engine) else 1e-3)


def test_sessions_with_different_images_do_not_disturb_each_other(engine) -> None:  # type: ignore[no-untyped-def]
    (ids_a, image_a), (ids_b, image_b) = _image(engine, 3, (200, 60)), _image(engine, 4, (64, 64))
    alone = {}
    for key, ids, image in (("a", ids_a, image_a), ("b", ids_b, image_b)):
        engine.open_session(key, ids, [image])
        alone[key] = []
        for _ in range(5):
            token = engine.score(key, [], GREEDY).greedy_ids[0]
            alone[key].append(token)
            engine.append(key, [token])
        engine.release(key)
    engine.open_session("a", ids_a, [image_a])
    engine.open_session("b", ids_b, [image_b])
    engine.open_session("text", engine.encode_prompt("No image here.", True))
    together: dict[str, list[int]] = {"a": [], "b": []}
    try:
        for _ in range(5):
            for key in ("a", "text", "b"):  # interleaved, as one edge replica serves many devices
                token = engine.score(key, [], GREEDY).greedy_ids[0]
                engine.append(key, [token])
                if key in together:
                    together[key].append(token)
    finally:
        for key in ("a", "b", "text"):
            engine.release(key)
    assert together == alone


def test_images_that_do_not_fill_their_blocks_are_refused(engine) -> None:  # type: ignore[no-untyped-def]
    ids, image = _image(engine, 5, (40, 40))
    _, other = _image(engine, 6, (300, 60))
    if engine.vision.tokens_for(other.tiles.shape) == engine.vision.tokens_for(image.tiles.shape):
        pytest.fail("the two test images must differ in token count")
    with pytest.raises(ValueError, match="image"):
        engine.open_session("bad", ids, [other])
    with pytest.raises(ValueError, match="image"):
        engine.open_session("none", ids, [])
