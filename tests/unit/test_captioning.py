"""The captioning data set and VLM pair (vision/scenes.py, vision/captioning.py): scene composition and
captions, the train/held-out split, the tokenizer and prompts, the image processor, a seconds-long training
run through the real pipeline, and (real_model) the accuracy of the full cached pair."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from aiflow_ray.vision import caption_pair, caption_training, captioning, scenes
from aiflow_ray.vision.prompting import IMAGE_CONTEXT, IMAGE_SPECIAL_TOKENS
from aiflow_ray.vision.scenes import BACKGROUND, CELL_SIZE, TILE_SIZE, Layout, Placement

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TINY_VISION = captioning.VisionSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
TINY_TEXT = captioning.TextSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return captioning.build_tokenizer()


def _item(split: str, label: int) -> int:
    """The first item of ``split`` with ``label`` (an index into load_split's arrays)."""
    _, labels = scenes.load_split(split)
    return int(np.flatnonzero(labels == label)[0])


def _layout(*cells_labels: tuple[int, int], split: str = "train") -> Layout:
    return Layout(split, tuple(Placement(cell, label, _item(split, label), (0, 0)) for cell, label in cells_labels))


# -- scenes ------------------------------------------------------------------------------------------------


def test_captions_name_count_items_and_positions_in_reading_order() -> None:
    t_shirt, trousers, bag, boot = 0, 1, 8, 9
    assert scenes.caption_for(_layout((0, bag))) == "one item: in the top left a bag."
    assert scenes.caption_for(_layout((1, boot), (3, trousers))) == (
        "two items: in the top right an ankle boot and in the bottom right a pair of trousers."
    )
    assert scenes.caption_for(_layout((0, t_shirt), (2, bag), (3, bag))) == (
        "three items: in the top left a t-shirt, in the bottom left a bag and in the bottom right a bag."
    )
    with pytest.raises(ValueError):
        scenes.caption_for(Layout("train", ()))
    with pytest.raises(ValueError):
        scenes.caption_for(_layout((0, bag), (1, bag), (2, bag), (3, bag)))


def test_all_captions_enumerates_every_layout_once() -> None:
    captions = scenes.all_captions()
    classes = len(scenes.CLASSES)
    assert len(captions) == len(set(captions)) == 4 * classes + 6 * classes**2 + 4 * classes**3


def test_a_scene_draws_its_items_in_their_cells_only() -> None:
    bag = 8
    image, caption, layout = scenes.compose_scene(_layout((1, bag), (2, bag)))
    assert image.mode == "RGB" and image.size == (TILE_SIZE, TILE_SIZE)
    assert caption == "two items: in the top right a bag and in the bottom left a bag."
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    grey = pixels[..., 0]
    cells = [grey[r * CELL_SIZE : (r + 1) * CELL_SIZE, c * CELL_SIZE : (c + 1) * CELL_SIZE]
             for r in (0, 1) for c in (0, 1)]
    assert (cells[0] == BACKGROUND).all() and (cells[3] == BACKGROUND).all()
    assert (cells[1] != BACKGROUND).mean() > 0.2 and (cells[2] != BACKGROUND).mean() > 0.2
    assert layout.placements[0].cell == 1


def test_jitter_moves_an_item_by_whole_pixels() -> None:
    bag = 8
    index = _item("train", bag)
    still = np.asarray(scenes.render(Layout("train", (Placement(3, bag, index, (0, 0)),))))
    moved = np.asarray(scenes.render(Layout("train", (Placement(3, bag, index, (-2, 1)),))))
    inner = slice(CELL_SIZE + 4, TILE_SIZE - 4)
    assert (np.roll(still, (1, -2), axis=(0, 1))[inner, inner] == moved[inner, inner]).all()
    with pytest.raises(ValueError):
        scenes.render(Layout("train", (Placement(3, bag, index, (scenes.JITTER_PX + 1, 0)),)))


def test_bad_layouts_are_refused() -> None:
    bag, boot = 8, 9
    with pytest.raises(ValueError, match="label"):
        scenes.render(Layout("train", (Placement(0, boot, _item("train", bag), (0, 0)),)))
    with pytest.raises(ValueError, match="distinct cells"):
        scenes.render(_layout((2, bag), (1, bag)))
    with pytest.raises(ValueError, match="split"):
        scenes.make_split("validation", 1, 0)


def test_splits_are_seeded_and_their_layouts_are_uniform_enough() -> None:
    first = scenes.make_split("train", 60, seed=5)
    again = scenes.make_split("train", 60, seed=5)
    other = scenes.make_split("train", 60, seed=6)
    assert [s.caption for s in first] == [s.caption for s in again]
    assert all((np.asarray(a.image) == np.asarray(b.image)).all() for a, b in zip(first, again, strict=True))
    assert [s.caption for s in first] != [s.caption for s in other]
    counts = {len(s.layout.placements) for s in first}
    labels = {p.label for s in first for p in s.layout.placements}
    assert counts == {1, 2, 3} and labels == set(scenes.CLASSES)
    assert all(s.caption == scenes.caption_for(s.layout) for s in first)


def test_held_out_scenes_use_no_item_image_seen_in_training() -> None:
    train_images, _ = scenes.load_split("train")
    test_images, test_labels = scenes.load_split("test")
    assert set(np.unique(test_labels)) == set(scenes.CLASSES)

    def digest(item: np.ndarray) -> bytes:
        return hashlib.blake2b(item.tobytes(), digest_size=16).digest()

    # The whole pools are disjoint (duplicates across Fashion-MNIST's splits are dropped from the test pool)...
    train_pool = {digest(item) for item in train_images}
    assert not train_pool & {digest(item) for item in test_images}
    # ... and so are the items that scenes actually show.
    held_out = scenes.make_split("test", 200, seed=captioning.EVAL_SEED)
    training = scenes.make_split("train", 200, seed=captioning.VERIFIER_TRAIN.seed)
    assert {s.layout.split for s in held_out} == {"test"} and {s.layout.split for s in training} == {"train"}
    shown_held_out = {digest(test_images[p.index]) for s in held_out for p in s.layout.placements}
    shown_training = {digest(train_images[p.index]) for s in training for p in s.layout.placements}
    assert shown_held_out and not shown_held_out & shown_training and not shown_held_out & train_pool


# -- tokenizer, prompts, pixels ----------------------------------------------------------------------------


def test_tokenizer_special_tokens_and_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    for token in captioning.SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert set(IMAGE_SPECIAL_TOKENS) <= set(captioning.SPECIAL_TOKENS)
    assert tokenizer.eos_token == captioning.IM_END and tokenizer.pad_token == captioning.ENDOFTEXT
    ids = captioning.prompt_ids(tokenizer)
    context = int(tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT))  # type: ignore[arg-type]
    assert ids.count(context) == captioning.TOKENS_PER_IMAGE
    text = str(tokenizer.decode(ids))
    assert text.startswith("<|im_start|>user\n<img><IMG_CONTEXT>") and text.endswith("<|im_start|>assistant\n")
    assert "Describe the image.<|im_end|>" in text
    for sample in ("def f(x):\n    return x ** 2", "Größe 😀 naïve", scenes.all_captions()[-1]):
        assert tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False)) == sample
    target = captioning.target_ids(tokenizer, "one item: in the top left a bag.")
    assert target[-1] == tokenizer.eos_token_id and len(target) < captioning.MAX_CAPTION_TOKENS


def test_pixel_values_match_the_saved_image_processor(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    images = [s.image for s in scenes.make_split("test", 3, seed=1)]
    captioning.save_image_processor(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["size"] == {"height": TILE_SIZE, "width": TILE_SIZE} and config["crop_to_patches"] is False
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    theirs = processor(images, return_tensors="pt")["pixel_values"]
    ours = captioning.pixel_values(images)
    assert ours.shape == (3, 3, TILE_SIZE, TILE_SIZE)
    assert float((theirs - ours).abs().max()) < 1e-5


# -- models and training -----------------------------------------------------------------------------------


def test_visual_tokens_map_to_their_cells(tokenizer: PreTrainedTokenizerFast) -> None:
    model = captioning.new_model(captioning.caption_config(tokenizer, TINY_TEXT, TINY_VISION), seed=0)
    cells = caption_training.visual_token_cells(model)
    assert len(cells) == captioning.TOKENS_PER_IMAGE
    assert cells == [0, 1, 2, 3]  # one token per cell, in reading order


def test_the_drafter_is_much_cheaper_per_token(tokenizer: PreTrainedTokenizerFast) -> None:
    vocab = len(tokenizer)
    verifier = captioning.text_flops_per_token(captioning.VERIFIER_TEXT, vocab)
    drafter = captioning.text_flops_per_token(captioning.DRAFTER_TEXT, vocab)
    assert verifier >= 3 * drafter


def test_a_short_training_run_lowers_the_loss_and_the_model_reloads(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path,
) -> None:
    import torch
    from transformers import InternVLForConditionalGeneration

    data = scenes.make_split("train", 8, seed=3)
    with captioning.torch_threads(captioning.TRAIN_THREADS):
        model = captioning.new_model(captioning.caption_config(tokenizer, TINY_TEXT, TINY_VISION), seed=0)
        probe = caption_training.CellProbe(model, seed=0)
        spec = captioning.TrainSpec(steps=40, batch_size=8, peak_lr=1e-2, warmup_steps=4, seed=0)
        losses = caption_training.train_captioner(model, tokenizer, spec, data=data, probe=probe, desc="smoke")
        assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])

        model.save_pretrained(tmp_path)
        reloaded = InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
        ids = torch.tensor([captioning.prompt_ids(tokenizer)])
        pixels = captioning.pixel_values([data[0].image])
        with torch.no_grad():
            a = model(input_ids=ids, pixel_values=pixels).logits
            b = reloaded(input_ids=ids, pixel_values=pixels).logits
        assert a.shape == (1, ids.shape[1], len(tokenizer)) and torch.allclose(a, b)

        images = [s.image for s in data[:3]]
        outputs = caption_training.greedy_outputs(reloaded, tokenizer, images, desc="smoke")
        assert len(outputs) == 3 and all(0 < len(o) <= captioning.MAX_CAPTION_TOKENS for o in outputs)
        assert 0.0 <= caption_training.caption_accuracy(tokenizer, outputs, data[:3]) <= 1.0
        # A model always agrees with its own greedy outputs (what teacher-forced agreement measures).
        assert caption_training.token_agreement(reloaded, tokenizer, images, outputs) == 1.0


# -- the full pair -----------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_the_full_pair_captions_held_out_scenes() -> None:
    """Builds the pair (a few minutes on two cores) unless cached, then evaluates it afresh."""
    import torch

    verifier_dir, _ = caption_pair.build_caption_pair()
    summary = json.loads((verifier_dir.parent / "complete.json").read_text())
    verifier, drafter, tokenizer = caption_pair.load_caption_pair()
    for a, b in zip(verifier.model.vision_tower.state_dict().values(),
                    drafter.model.vision_tower.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # shared vision tower: a device may send features instead of pixels
    with captioning.torch_threads(captioning.TRAIN_THREADS):
        metrics = caption_training.evaluate_pair(verifier, drafter, tokenizer)
    print(f"held-out accuracy: verifier {metrics['verifier_accuracy']:.3f}, "
          f"drafter {metrics['drafter_accuracy']:.3f}, token agreement {metrics['token_agreement']:.3f} "
          f"(the build took {summary['build_s']} s)")
    assert metrics["eval_scenes"] >= 200
    assert metrics["verifier_accuracy"] >= 0.90
    assert metrics["verifier_accuracy"] == pytest.approx(summary["verifier_accuracy"], abs=0.02)
