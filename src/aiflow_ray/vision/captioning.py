"""The image-captioning VLM pair the project trains itself: tokenizer, configs and specs (its training:
``caption_training.py``; building and caching it: ``caption_pair.py``).

Both models are ``InternVLForConditionalGeneration`` (an ``InternVLVisionConfig`` vision tower, pixel shuffle,
an MLP projector and a Qwen2 language model) that caption the Fashion-MNIST scenes of ``scenes.py``. The
verifier is trained first with everything trainable; the drafter then gets a frozen copy of the verifier's
vision tower and trains only its own projector and a much smaller language model. The two vision towers are
therefore identical, so a device may send the vision tower's output (the pixel-shuffled, pre-projector
features, ``TOKENS_PER_IMAGE`` x 4 x the tower's hidden size floats) instead of pixels.

Patches are 28 pixels, so pixel shuffle makes exactly one visual token per scene cell (``TOKENS_PER_IMAGE`` is
4): the projector is then a per-cell item classifier and the language model only has to look at the cell it
has just named. With 14-pixel patches (four tokens per cell) a model trained for minutes mixes cells up and
stays under 90% of captions right.

Prompts are built exactly as serving builds them: the ChatML template renders a user turn whose content is
``user_turn_text([None, PROMPT])``, and ``expand_image_placeholders`` expands its ``<image>`` to
``TOKENS_PER_IMAGE`` context tokens. Everything is seeded; on CPU two builds give identical weights.

``caption_pair.build_caption_pair`` caches the pair under ``aiflow_home()/models/caption-v{CAPTION_VERSION}``
and writes ``complete.json`` (with the evaluation metrics) last, so a crash never leaves a half-built cache. Run
``python -m aiflow_ray.vision.caption_pair [--force] [--eval]`` to build it (about 2.5 minutes on one core).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aiflow_ray import envs
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.vision import scenes
from aiflow_ray.vision.prompting import (
    IMAGE_CONTEXT,
    IMAGE_END,
    IMAGE_SPECIAL_TOKENS,
    IMAGE_START,
    expand_image_placeholders,
    user_turn_text,
)
from aiflow_ray.vision.scenes import TILE_SIZE

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast

log = get_logger(__name__)

CAPTION_VERSION = 1
VOCAB_SIZE = 1024
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *IMAGE_SPECIAL_TOKENS)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPT = "Describe the image."

PATCH_SIZE = 28  # pixels: 112 / 28 = 4x4 patches, one visual token per cell after pixel shuffle
DOWNSAMPLE_RATIO = 0.5  # pixel shuffle merges 2x2 patches into one visual token
TOKENS_PER_IMAGE = int((TILE_SIZE // PATCH_SIZE * DOWNSAMPLE_RATIO) ** 2)  # 4 visual tokens per image
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_CAPTION_TOKENS = 40  # the longest caption is ~30 tokens with this tokenizer

EVAL_SCENES = 256
EVAL_SEED = 2024
# One intra-op thread: results then do not depend on the machine's core count (same weights everywhere), and
# on a shared 2-core machine a second OpenMP thread stalls at every barrier while another process holds a core
# (measured 13x slower per step than one thread under such load).
TRAIN_THREADS = 1


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch_size: int
    peak_lr: float
    warmup_steps: int
    seed: int
    weight_decay: float = 0.01


VISION = VisionSpec(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=192)
VERIFIER_TEXT = TextSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256)
DRAFTER_TEXT = TextSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
# Seeing is learnt first, alone, on scenes with three or four items (nearly twice the items per step of a
# captioned scene); the verifier's captioning then trains everything, and the drafter its projector and language model.
VISION_TRAIN = TrainSpec(steps=800, batch_size=32, peak_lr=2e-3, warmup_steps=20, seed=10)
VERIFIER_TRAIN = TrainSpec(steps=350, batch_size=32, peak_lr=2e-3, warmup_steps=20, seed=11)
DRAFTER_TRAIN = TrainSpec(steps=400, batch_size=32, peak_lr=3e-3, warmup_steps=20, seed=12)


def caption_dir(home: Path | None = None) -> Path:
    return (home or envs.aiflow_home()) / "models" / f"caption-v{CAPTION_VERSION}"


# -- tokenizer and prompts ---------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over every caption, the prompt and Python's documentation topics (so any text
    encodes), with the ChatML and image tokens as single special ids and the ChatML template."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # Captions are repeated so that their words win merges over the documentation's.
    # The chat scaffolding is repeated too, so that the prompt (every sequence's prefix) is short.
    chat = [f"user\n{IMAGE_START}{IMAGE_END}\n{PROMPT}\nassistant\n"] * 2000
    corpus = [*scenes.all_captions() * 4, *chat, *(topics[name] for name in sorted(topics))]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=IM_END, pad_token=ENDOFTEXT)
    fast.chat_template = CHAT_TEMPLATE
    for token in SPECIAL_TOKENS:
        ids = fast.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"special token {token} encodes to {ids}, not one id")
    return fast


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str = PROMPT) -> list[int]:
    """The ids of a one-image user turn plus the assistant header, built exactly as serving builds them."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_turn_text([None, prompt])}], add_generation_prompt=True, tokenize=False,
    )
    assert isinstance(text, str)
    return list(tokenizer.encode(expand_image_placeholders(text, [TOKENS_PER_IMAGE]), add_special_tokens=False))


def target_ids(tokenizer: PreTrainedTokenizerFast, caption: str) -> list[int]:
    """What the model learns to answer: the caption's ids, then ``<|im_end|>``."""
    return [*tokenizer.encode(caption, add_special_tokens=False), _id(tokenizer, IM_END)]


def _id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    value = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(value, int)
    return value


def pixel_values(images: Sequence[Image.Image]) -> torch.Tensor:
    """[n, 3, TILE_SIZE, TILE_SIZE] float32, ImageNet-normalised: what the saved image processor produces."""
    import torch

    rgb = np.stack([np.asarray(image.convert("RGB"), np.float32) for image in images]) / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(((rgb - mean) / std).transpose(0, 3, 1, 2)))


# -- models ------------------------------------------------------------------------------------------------


def caption_config(tokenizer: PreTrainedTokenizerFast, text: TextSpec, vision: VisionSpec = VISION) -> InternVLConfig:
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    eos, pad = _id(tokenizer, IM_END), _id(tokenizer, ENDOFTEXT)
    vision_config = InternVLVisionConfig(
        hidden_size=vision.hidden_size, num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads, intermediate_size=vision.intermediate_size,
        image_size=TILE_SIZE, patch_size=PATCH_SIZE, layer_scale_init_value=1.0,
    )
    text_config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=text.hidden_size, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, num_key_value_heads=text.num_kv_heads,
        intermediate_size=text.intermediate_size, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=eos, bos_token_id=pad, pad_token_id=pad,
    )
    return InternVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=_id(tokenizer, IMAGE_CONTEXT),
        image_seq_length=TOKENS_PER_IMAGE, downsample_ratio=DOWNSAMPLE_RATIO, tie_word_embeddings=True,
    )


def new_model(config: InternVLConfig, seed: int) -> InternVLForConditionalGeneration:
    import torch
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config).float()


def text_flops_per_token(text: TextSpec, vocab_size: int) -> int:
    """Multiply-adds x2 of one decoded token in the language model (weights only, no attention scores)."""
    head_dim = text.hidden_size // text.num_heads
    attention = text.hidden_size * head_dim * (2 * text.num_heads + 2 * text.num_kv_heads)
    mlp = 3 * text.hidden_size * text.intermediate_size
    return 2 * (text.num_layers * (attention + mlp) + text.hidden_size * vocab_size)


# -- training ----------------------------------------------------------------------------------------------


def save_image_processor(out: Path) -> None:
    """The processor config matching ``pixel_values``: no cropping, resize to TILE_SIZE, ImageNet stats."""
    from transformers import GotOcr2ImageProcessor
    from transformers.utils import logging as hf_logging

    # Without torchvision the class warns that it falls back to its Pillow twin; the saved config is the same.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        GotOcr2ImageProcessor(
            size={"height": TILE_SIZE, "width": TILE_SIZE}, crop_to_patches=False,
            image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
        ).save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` torch intra-op threads, restoring the previous setting after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
