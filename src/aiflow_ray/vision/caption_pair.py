"""Building the captioning pair: trained once with ``caption_training``, evaluated, cached under AIFLOW_HOME.

``python -m aiflow_ray.vision.caption_pair [--force] [--eval]`` builds it (about 2.5 minutes on one core).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aiflow_ray.logging_utils import get_logger
from aiflow_ray.vision import scenes
from aiflow_ray.vision.caption_training import CellProbe, evaluate_pair, train_captioner, train_vision
from aiflow_ray.vision.captioning import (
    CAPTION_VERSION,
    DRAFTER_TEXT,
    DRAFTER_TRAIN,
    ENDOFTEXT,
    IM_END,
    TOKENS_PER_IMAGE,
    TRAIN_THREADS,
    VERIFIER_TEXT,
    VERIFIER_TRAIN,
    VISION_TRAIN,
    _id,
    build_tokenizer,
    caption_config,
    caption_dir,
    new_model,
    prompt_ids,
    save_image_processor,
    text_flops_per_token,
    torch_threads,
)
from aiflow_ray.vision.scenes import TILE_SIZE

if TYPE_CHECKING:
    from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerFast

log = get_logger(__name__)


def train_pair(tokenizer: PreTrainedTokenizerFast) -> tuple[
        InternVLForConditionalGeneration, InternVLForConditionalGeneration, dict[str, Any]]:
    """(verifier, drafter, training summary): the verifier sees first, then captions with everything
    trainable; the drafter gets a frozen copy of its vision tower and trains its projector and language model."""
    started_s = time.monotonic()
    verifier = new_model(caption_config(tokenizer, VERIFIER_TEXT), seed=VERIFIER_TRAIN.seed)
    verifier_probe = CellProbe(verifier, seed=VISION_TRAIN.seed)
    vision_losses = train_vision(verifier, VISION_TRAIN, verifier_probe, desc="verifier vision")
    vision_s = time.monotonic() - started_s
    verifier_losses = train_captioner(verifier, tokenizer, VERIFIER_TRAIN, probe=verifier_probe, desc="verifier")
    verifier_s = time.monotonic() - started_s - vision_s

    drafter = new_model(caption_config(tokenizer, DRAFTER_TEXT), seed=DRAFTER_TRAIN.seed)
    drafter.model.vision_tower.load_state_dict(verifier.model.vision_tower.state_dict())
    drafter.model.vision_tower.requires_grad_(False)
    drafter_losses = train_captioner(
        drafter, tokenizer, DRAFTER_TRAIN, probe=CellProbe(drafter, seed=DRAFTER_TRAIN.seed), desc="drafter",
    )
    drafter.model.vision_tower.requires_grad_(True)
    summary = {
        "vision_final_probe_loss": float(np.mean(vision_losses[-20:])),
        "verifier_final_loss": float(np.mean(verifier_losses[-20:])),
        "drafter_final_loss": float(np.mean(drafter_losses[-20:])),
        "vision_train_s": round(vision_s, 1),
        "verifier_train_s": round(verifier_s, 1),
        "drafter_train_s": round(time.monotonic() - started_s - vision_s - verifier_s, 1),
    }
    return verifier, drafter, summary


def build_caption_pair(home: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """Return (verifier_dir, drafter_dir), training and evaluating the pair when not cached.

    Fashion-MNIST is cached under the default ``aiflow_home()`` whatever ``home`` is (see ``scenes``).
    """
    root = caption_dir(home)
    verifier_dir, drafter_dir = root / "verifier", root / "drafter"
    if not force and (root / "complete.json").exists():
        return verifier_dir, drafter_dir
    with torch_threads(TRAIN_THREADS):
        started_s = time.monotonic()
        shutil.rmtree(root, ignore_errors=True)
        scenes.load_split("test")  # fetches Fashion-MNIST if needed and loads both splits
        tokenizer = build_tokenizer()
        log.info("tokenizer: %d ids; the prompt is %d tokens", len(tokenizer), len(prompt_ids(tokenizer)))
        verifier, drafter, training = train_pair(tokenizer)
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
            **training,
            "verifier_params": sum(p.numel() for p in verifier.parameters()),
            "drafter_params": sum(p.numel() for p in drafter.parameters()),
            "vision_params": sum(p.numel() for p in verifier.model.vision_tower.parameters()),
            "verifier_text_flops_per_token": text_flops_per_token(VERIFIER_TEXT, vocab),
            "drafter_text_flops_per_token": text_flops_per_token(DRAFTER_TEXT, vocab),
            "train": {"vision": asdict(VISION_TRAIN), "verifier": asdict(VERIFIER_TRAIN),
                      "drafter": asdict(DRAFTER_TRAIN)},
            "threads": TRAIN_THREADS,
            "build_s": round(time.monotonic() - started_s, 1),
        }
        # Written last: its presence is what marks the cache complete.
        (root / "complete.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "built the caption pair at %s in %.0f s: verifier accuracy %.3f, drafter accuracy %.3f, agreement %.3f",
        root, summary["build_s"], metrics["verifier_accuracy"], metrics["drafter_accuracy"],
        metrics["token_agreement"],
    )
    return verifier_dir, drafter_dir


def load_caption_pair(home: Path | None = None) -> tuple[InternVLForConditionalGeneration,
                                                           InternVLForConditionalGeneration, PreTrainedTokenizerFast]:
    """(verifier, drafter, tokenizer) of the cached pair, built when missing."""
    from transformers import InternVLForConditionalGeneration, PreTrainedTokenizerFast

    verifier_dir, drafter_dir = build_caption_pair(home)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(verifier_dir)
    verifier = InternVLForConditionalGeneration.from_pretrained(verifier_dir).eval()
    drafter = InternVLForConditionalGeneration.from_pretrained(drafter_dir).eval()
    return verifier, drafter, tokenizer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--eval", action="store_true", help="evaluate the (cached) pair again and print metrics")
    args = parser.parse_args(argv)
    verifier_dir, drafter_dir = build_caption_pair(force=args.force)
    log.info("verifier: %s, drafter: %s", verifier_dir, drafter_dir)
    if args.eval:
        verifier, drafter, tokenizer = load_caption_pair()
        with torch_threads(TRAIN_THREADS):
            print(json.dumps(evaluate_pair(verifier, drafter, tokenizer), indent=2))


if __name__ == "__main__":
    main()
