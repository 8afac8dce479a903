"""A tiny random InternVL pair for image tests and ``make run PROFILE=tiny``, built locally in a second.

Same class as released InternVL "-hf" checkpoints (``InternVLForConditionalGeneration``: an InternViT-style
vision tower, an MLP projector, a Qwen2 language model), with small dimensions. As in the tiny text pair
(``models.tiny``), the drafter is nested in the verifier: the same vision tower and projector (a shared
encoder, so the ``features`` upload applies), embeddings, head and first language layer; the verifier's later
layers write small residual updates, which gives realistic, nonzero acceptance without training. Tiles are
56 px (4 x 4 patches of 14 px, pixel-shuffled to 4 visual tokens a tile), with InternVL's dynamic tiling up
to 4 tiles plus a thumbnail, so tests exercise tiling at a few tokens an image. Every tensor of the vision
tower is random, those transformers starts at constants included (version 2).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from aiflow_ray import envs
from aiflow_ray.logging_utils import get_logger
from aiflow_ray.models.tiny import nest, save_vision_pair, tiny_tokenizer_with
from aiflow_ray.vision.preprocess import IMAGENET_MEAN, IMAGENET_STD
from aiflow_ray.vision.prompting import IMAGE_CONTEXT, IMAGE_SPECIAL_TOKENS

log = get_logger(__name__)

TINY_VLM_VERSION = 2
TILE_SIZE = 56
MAX_TILES = 4
_DRAFTER_LAYERS = 1
_VERIFIER_LAYERS = 4
_INIT_RANGE = 0.25


def tiny_vlm_dir(home: Path | None = None) -> Path:
    return (home or envs.aiflow_home()) / "models" / f"tiny-vlm-v{TINY_VLM_VERSION}"


def build_tiny_vlm_pair(home: Path | None = None, force: bool = False) -> tuple[Path, Path]:
    """Return (verifier_dir, drafter_dir), building them deterministically when missing."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl import InternVLVisionConfig

    root = tiny_vlm_dir(home)
    if not force and (root / "complete.json").exists():
        return root / "verifier", root / "drafter"
    shutil.rmtree(root, ignore_errors=True)
    tokenizer = tiny_tokenizer_with(IMAGE_SPECIAL_TOKENS, home)
    vocab = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT)
    assert isinstance(image_token_id, int)

    def config(layers: int) -> InternVLConfig:
        text = Qwen2Config(
            vocab_size=vocab, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=layers, max_position_embeddings=8192, tie_word_embeddings=True,
            initializer_range=_INIT_RANGE, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                      image_size=TILE_SIZE, patch_size=14, initializer_range=_INIT_RANGE)
        return InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                              downsample_ratio=0.5, tie_word_embeddings=True)

    torch.manual_seed(4321)
    verifier = InternVLForConditionalGeneration(config(_VERIFIER_LAYERS)).float().eval()
    with torch.no_grad():
        # Random projector outputs the size of token embeddings, so the image steers the output.
        verifier.model.multi_modal_projector.linear_2.weight.mul_(4.0)
        # transformers starts the class token, the position embeddings and the norms at constants (zeros, ones):
        # left so, an engine or a converter that misplaces them would still match. Trained models never have them so.
        embeddings = verifier.model.vision_tower.embeddings
        embeddings.position_embeddings.normal_(0.0, 1.0)
        embeddings.cls_token.normal_(0.0, 1.0)
        for name, param in verifier.model.vision_tower.named_parameters():
            if "layernorm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    drafter = InternVLForConditionalGeneration(config(_DRAFTER_LAYERS)).float().eval()
    nest(verifier, drafter, verifier.model.language_model.layers, "model.language_model.layers.", _DRAFTER_LAYERS)
    processor = {"crop_to_patches": True, "min_patches": 1, "max_patches": MAX_TILES,
                 "size": {"height": TILE_SIZE, "width": TILE_SIZE},
                 "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    built = save_vision_pair(root, verifier, drafter, tokenizer, processor, TINY_VLM_VERSION)
    log.info("built tiny nested InternVL pair (vocab %d, %d px tiles) at %s", vocab, TILE_SIZE, root)
    return built
