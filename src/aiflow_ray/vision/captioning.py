"""The image-captioning VLM pair the project trains itself: tokenizer, configs, training, evaluation, cache.

Both models are ``InternVLForConditionalGeneration`` (an ``InternVLVisionConfig`` vision tower, pixel shuffle,
an MLP projector and a Qwen2 language model) that caption the Fashion-MNIST scenes of ``scenes.py``. The
verifier is trained first with everything trainable; the drafter then gets a frozen copy of the verifier's
vision tower and trains only its own projector and a much smaller language model. The two vision towers are
therefore identical, so a device may send the vision tower's output (the pixel-shuffled, pre-projector
features) instead of pixels.

Prompts are built exactly as serving builds them: the ChatML template renders a user turn whose content is
``user_turn_text([None, PROMPT])``, and ``expand_image_placeholders`` expands its ``<image>`` to
``TOKENS_PER_IMAGE`` context tokens. Everything is seeded; on CPU two builds give identical weights.

``build_caption_pair`` caches the pair under ``aiflow_home()/models/caption-v{CAPTION_VERSION}`` and writes
``complete.json`` (with the evaluation metrics) last, so a crash never leaves a half-built cache. Run
``python -m aiflow_ray.vision.captioning [--force] [--eval]`` to build it (a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

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
from aiflow_ray.vision.scenes import TILE_SIZE, Scene

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

PATCH_SIZE = 14  # pixels: 112 / 14 = 8x8 patches
DOWNSAMPLE_RATIO = 0.5  # pixel shuffle merges 2x2 patches into one visual token
TOKENS_PER_IMAGE = int((TILE_SIZE // PATCH_SIZE * DOWNSAMPLE_RATIO) ** 2)  # 16 visual tokens per image
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_CAPTION_TOKENS = 40  # the longest caption is ~30 tokens with this tokenizer

EVAL_SCENES = 256
EVAL_SEED = 2024
_THREADS = 2


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


VISION = VisionSpec(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=256)
VERIFIER_TEXT = TextSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384)
DRAFTER_TEXT = TextSpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192)
VERIFIER_TRAIN = TrainSpec(steps=600, batch_size=32, peak_lr=2e-3, warmup_steps=40, seed=11)
DRAFTER_TRAIN = TrainSpec(steps=300, batch_size=32, peak_lr=3e-3, warmup_steps=20, seed=12)


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


def _batches(source: Sequence[Scene] | int, batch_size: int) -> Iterator[list[Scene]]:
    """Batches from a fixed pool (cycled in order) or, for an int seed, an endless stream of fresh scenes."""
    if isinstance(source, int):
        rng = np.random.default_rng([source, 0])
        while True:
            yield [scenes.compose_scene(scenes.random_layout(rng, "train")) for _ in range(batch_size)]
    else:
        start = 0
        while True:
            yield [source[(start + i) % len(source)] for i in range(batch_size)]
            start += batch_size


def _batch_tensors(
    tokenizer: PreTrainedTokenizerFast, prompt: Sequence[int], batch: Sequence[Scene],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels aligned with the logits that predict them, pixel_values); right-padded."""
    import torch

    targets = [target_ids(tokenizer, scene.caption) for scene in batch]
    width = len(prompt) + max(len(t) for t in targets)
    pad = _id(tokenizer, ENDOFTEXT)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, target in enumerate(targets):
        sequence = [*prompt, *target]
        ids[row, : len(sequence)] = torch.tensor(sequence)
        # The logit at position i predicts token i + 1; right padding never affects earlier positions.
        labels[row, len(prompt) - 1 : len(sequence) - 1] = torch.tensor(target)
    return ids, labels, pixel_values([scene.image for scene in batch])


def train_captioner(
    model: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    spec: TrainSpec,
    data: Sequence[Scene] | None = None,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` (its parameters with ``requires_grad``) to caption scenes; returns the loss per step.

    ``data`` is a fixed pool cycled in order; without it every step draws fresh training scenes.
    """
    import torch

    torch.set_num_threads(_THREADS)
    torch.manual_seed(spec.seed)
    prompt = prompt_ids(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.peak_lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup_steps:
            return spec.peak_lr * (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
        return spec.peak_lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    model.train()
    losses: list[float] = []
    batches = _batches(data if data is not None else spec.seed, spec.batch_size)
    with tqdm(total=spec.steps, desc=desc, unit="step") as bar:
        for step in range(spec.steps):
            ids, labels, pixels = _batch_tensors(tokenizer, prompt, next(batches))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            first = len(prompt) - 1  # no logits are needed for the prompt's earlier positions
            logits = model(input_ids=ids, pixel_values=pixels, logits_to_keep=ids.shape[1] - first).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, first:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss))
            bar.update(1)
            if step % 10 == 0 or step == spec.steps - 1:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    return losses


# -- evaluation --------------------------------------------------------------------------------------------


def greedy_outputs(
    model: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    images: Sequence[Image.Image],
    batch_size: int = 64,
    desc: str = "caption",
) -> list[list[int]]:
    """Greedy output ids per image, up to and including ``<|im_end|>`` (if produced in time)."""
    import torch

    prompt = prompt_ids(tokenizer)
    eos = _id(tokenizer, IM_END)
    pad = _id(tokenizer, ENDOFTEXT)
    out: list[list[int]] = []
    with torch.no_grad(), tqdm(total=len(images), desc=desc, unit="scene") as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            ids = torch.tensor([prompt] * len(chunk))
            generated = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values(chunk),
                max_new_tokens=MAX_CAPTION_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )
            for row in generated[:, len(prompt) :].tolist():
                out.append(row[: row.index(eos) + 1] if eos in row else row)
            bar.update(len(chunk))
    return out


def decode_caption(tokenizer: PreTrainedTokenizerFast, output: Sequence[int]) -> str:
    eos = _id(tokenizer, IM_END)
    body = list(output[:-1]) if output and output[-1] == eos else list(output)
    return str(tokenizer.decode(body, skip_special_tokens=False))


def caption_accuracy(tokenizer: PreTrainedTokenizerFast, outputs: Sequence[Sequence[int]], data: Sequence[Scene]) -> float:
    """Exact match: the greedy output is the caption followed by ``<|im_end|>``."""
    hits = sum(list(out) == target_ids(tokenizer, scene.caption) for out, scene in zip(outputs, data, strict=True))
    return hits / len(data)


def token_agreement(
    drafter: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    images: Sequence[Image.Image],
    verifier_outputs: Sequence[Sequence[int]],
    batch_size: int = 64,
) -> float:
    """Fraction of the verifier's output tokens that the drafter predicts greedily given the verifier's
    prefix (teacher-forced): the acceptance rate of greedy speculative decoding, token by token."""
    import torch

    prompt = prompt_ids(tokenizer)
    pad = _id(tokenizer, ENDOFTEXT)
    agreed = total = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            outputs = verifier_outputs[start : start + batch_size]
            width = len(prompt) + max(len(o) for o in outputs)
            ids = torch.full((len(outputs), width), pad, dtype=torch.long)
            for row, output in enumerate(outputs):
                ids[row, : len(prompt) + len(output)] = torch.tensor([*prompt, *output])
            logits = drafter(input_ids=ids, pixel_values=pixel_values(images[start : start + batch_size])).logits
            guesses = logits.argmax(-1)
            for row, output in enumerate(outputs):
                predicted = guesses[row, len(prompt) - 1 : len(prompt) - 1 + len(output)].tolist()
                agreed += sum(p == t for p, t in zip(predicted, output, strict=True))
                total += len(output)
    return agreed / max(1, total)


def evaluate_pair(
    verifier: InternVLForConditionalGeneration,
    drafter: InternVLForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    count: int = EVAL_SCENES,
    seed: int = EVAL_SEED,
) -> dict[str, Any]:
    """Greedy caption accuracy of both models and their token agreement on ``count`` held-out scenes."""
    data = scenes.make_split("test", count, seed)
    images = [scene.image for scene in data]
    verifier_outputs = greedy_outputs(verifier, tokenizer, images, desc="verifier eval")
    drafter_outputs = greedy_outputs(drafter, tokenizer, images, desc="drafter eval")
    metrics = {
        "eval_scenes": count,
        "eval_seed": seed,
        "verifier_accuracy": caption_accuracy(tokenizer, verifier_outputs, data),
        "drafter_accuracy": caption_accuracy(tokenizer, drafter_outputs, data),
        "token_agreement": token_agreement(drafter, tokenizer, images, verifier_outputs),
    }
    misses = [(scene.caption, decode_caption(tokenizer, out)) for out, scene in zip(verifier_outputs, data, strict=True)
              if list(out) != target_ids(tokenizer, scene.caption)]
    for want, got in misses[:5]:
        log.info("verifier miss: want %r got %r", want, got)
    return metrics


# -- the cached pair ---------------------------------------------------------------------------------------


def save_image_processor(out: Path) -> None:
    """The processor config matching ``pixel_values``: no cropping, resize to TILE_SIZE, ImageNet stats."""
    from transformers import GotOcr2ImageProcessor

    GotOcr2ImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE}, crop_to_patches=False,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    ).save_pretrained(out)


def build_caption_pair(home: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """Return (verifier_dir, drafter_dir), training and evaluating the pair when not cached."""
    import torch

    root = caption_dir(home)
    verifier_dir, drafter_dir = root / "verifier", root / "drafter"
    if not force and (root / "complete.json").exists():
        return verifier_dir, drafter_dir
    torch.set_num_threads(_THREADS)
    started_s = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    scenes.load_split("test")  # fetches Fashion-MNIST once, before any timing of training
    tokenizer = build_tokenizer()
    log.info("tokenizer: %d ids; prompt is %d tokens", len(tokenizer), len(prompt_ids(tokenizer)))

    verifier = new_model(caption_config(tokenizer, VERIFIER_TEXT), seed=VERIFIER_TRAIN.seed)
    verifier_losses = train_captioner(verifier, tokenizer, VERIFIER_TRAIN, desc="verifier")

    drafter = new_model(caption_config(tokenizer, DRAFTER_TEXT), seed=DRAFTER_TRAIN.seed)
    drafter.model.vision_tower.load_state_dict(verifier.model.vision_tower.state_dict())
    drafter.model.vision_tower.requires_grad_(False)
    drafter_losses = train_captioner(drafter, tokenizer, DRAFTER_TRAIN, desc="drafter")
    drafter.model.vision_tower.requires_grad_(True)

    metrics = evaluate_pair(verifier, drafter, tokenizer)
    vocab = len(tokenizer)
    for model, out in ((verifier, verifier_dir), (drafter, drafter_dir)):
        model.generation_config.eos_token_id = _id(tokenizer, IM_END)
        model.generation_config.pad_token_id = _id(tokenizer, ENDOFTEXT)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_image_processor(out)
    summary = {
        "version": CAPTION_VERSION,
        "vocab_size": vocab,
        "tile_size": TILE_SIZE,
        "tokens_per_image": TOKENS_PER_IMAGE,
        "classes": {scenes.CLASS_NOUNS[label]: label for label in scenes.CLASSES},
        **metrics,
        "verifier_final_loss": float(np.mean(verifier_losses[-20:])),
        "drafter_final_loss": float(np.mean(drafter_losses[-20:])),
        "verifier_params": sum(p.numel() for p in verifier.parameters()),
        "drafter_params": sum(p.numel() for p in drafter.parameters()),
        "verifier_text_flops_per_token": text_flops_per_token(VERIFIER_TEXT, vocab),
        "drafter_text_flops_per_token": text_flops_per_token(DRAFTER_TEXT, vocab),
        "verifier_train": asdict(VERIFIER_TRAIN),
        "drafter_train": asdict(DRAFTER_TRAIN),
        "build_s": round(time.monotonic() - started_s, 1),
    }
    (root / "complete.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "built caption pair at %s in %.0f s: verifier accuracy %.3f, drafter accuracy %.3f, agreement %.3f",
        root, summary["build_s"], metrics["verifier_accuracy"], metrics["drafter_accuracy"],
        metrics["token_agreement"],
    )
    return verifier_dir, drafter_dir


def load_caption_pair(home: Path | None = None) -> tuple[InternVLForConditionalGeneration,
                                                           InternVLForConditionalGeneration, PreTrainedTokenizerFast]:
    """(verifier, drafter, tokenizer) of the cached pair, built when missing."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    verifier_dir, drafter_dir = build_caption_pair(home)
    tokenizer = AutoTokenizer.from_pretrained(verifier_dir)
    verifier = InternVLForConditionalGeneration.from_pretrained(verifier_dir).eval()
    drafter = InternVLForConditionalGeneration.from_pretrained(drafter_dir).eval()
    return verifier, drafter, tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--eval", action="store_true", help="evaluate the (cached) pair again and print metrics")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(_THREADS)
    verifier_dir, drafter_dir = build_caption_pair(force=args.force)
    log.info("verifier: %s, drafter: %s", verifier_dir, drafter_dir)
    if args.eval:
        verifier, drafter, tokenizer = load_caption_pair()
        print(json.dumps(evaluate_pair(verifier, drafter, tokenizer), indent=2))


if __name__ == "__main__":
    main()
